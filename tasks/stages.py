"""One task per pipeline stage. Each output lives at SD2_HOME/artifacts/<stage>/<key>, where the key hashes
the inputs' *content* (model and data digests, the config): a re-run with the same inputs reuses the
result, through Prefect's cache or, if that cache is gone, by finding the finished directory."""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import uuid
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.concurrency.sync import concurrency

from sd2.errors import writing
from sd2.models import model_digest, sd2_home


def _digest(path_or_spec) -> str:
    p = Path(str(path_or_spec))
    if p.is_dir() and (p / "sd2_manifest.json").exists():  # distilled dataset: its files
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return model_digest(str(path_or_spec))


def stage_key(stage: str, config: dict, inputs: dict) -> str:
    """sha256 of the stage name, its config and the content digests of its inputs."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": {k: _digest(v) for k, v in inputs.items()
                                                                      if v is not None}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stage_dir(stage: str, key: str) -> Path:
    return sd2_home() / "artifacts" / stage / key


def _key_fn(stage: str, inputs: tuple[str, ...], config_of=None):
    """Prefect cache key = the content key of the stage (the key that names its output dir) + the generation of
    that dir. A generation (a uuid in `<dir>.gen`) is drawn whenever the dir is not complete, so a Prefect record
    that outlived its output (deleted by hand, disk cleaned) is never served: the task runs and rebuilds the dir,
    and its record, stored under the new generation, is served from then on."""
    def fn(ctx, params):
        bound = inspect.signature(ctx.task.fn).bind_partial(**params)
        bound.apply_defaults()  # the output dir's key includes defaulted arguments too
        params = dict(bound.arguments)
        config = config_of(params) if config_of else {k: v for k, v in params.items() if k not in inputs}
        key = stage_key(stage, config, {k: params.get(k) for k in inputs})
        out = stage_dir(stage, key)
        gen = out.with_name(out.name + ".gen")
        if not (_done(out) and gen.exists()):
            out.parent.mkdir(parents=True, exist_ok=True)
            gen.write_text(uuid.uuid4().hex)
        return f"{key}-{gen.read_text().strip()}"
    return fn


@contextmanager
def gpu_slot():
    """A slot of the global concurrency limit `gpu` when tasks run against a Prefect server (several workers
    share the GPUs). Nothing in plain code or with the embedded API: there one process runs everything, and
    its per-process server does not expire the lease of a killed run, which would block the re-run.
    If the server cannot be reached, the stage runs without the slot rather than fail: its output is then
    kept even when the flow run itself cannot go on (see README, "When things fail")."""
    import logging
    import os

    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None or not os.environ.get("PREFECT_API_URL"):
        yield
        return
    # A short lease: a worker killed while holding the slot frees it within a minute, not after Prefect's
    # default five (the holder renews it every 45 s while alive; a failed renewal does not stop the stage).
    slot = concurrency("gpu", occupy=1, strict=False, lease_duration=60, raise_on_lease_renewal_failure=False)
    try:
        slot.__enter__()
    except Exception as exc:  # noqa: BLE001 - the API is gone: the work matters more than the slot
        logging.getLogger("sd2").warning("gpu slot: Prefect API unreachable (%s); running without it", exc)
        yield
        return
    try:
        yield
    finally:
        try:
            slot.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            logging.getLogger("sd2").warning("gpu slot: could not release (%s); its lease expires in 60 s", exc)


@contextmanager
def stage_lock(out: Path):
    """Exclusive lock on one stage output: two sweeps (or workers) sharing SD2_HOME compute it once; the
    second waits, then finds it done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _done(d: Path) -> bool:
    return d.is_dir() and ((d / "config.json").exists() or (d / "sd2_manifest.json").exists()
                           or (d / "eval.json").exists())


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass next time: bad input (UserError) fails at once."""
    from sd2.errors import UserError

    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


_COMMON = dict(persist_result=True, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
               log_prints=True)


@task(name="self-distill", cache_key_fn=_key_fn("distill", ("target", "prompts")), **_COMMON)
def distill_task(target: str, prompts: str, mode: str, limit: int, max_new_tokens: int, batch_size: int,
                 threads: int = 1, seed: int = 0) -> str:
    from sd2.config import DistillConfig
    from sd2.distill import distill

    key = stage_key("distill", dict(mode=mode, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    threads=threads, seed=seed), {"target": target, "prompts": prompts})
    out = stage_dir("distill", key)
    with stage_lock(out):
        if not _done(out):
            with gpu_slot():
                distill(DistillConfig(target=target, prompts=prompts, out=out, mode=mode, limit=limit,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads, seed=seed,
                                      overwrite=True), progress=False)
    return str(out)


@task(name="derive-drafter", cache_key_fn=_key_fn("derive", ("target",)), **_COMMON)
def derive_task(target: str, keep_layers: str) -> str:
    from sd2.prune.layers import layer_prune_to_dir

    out = stage_dir("derive", stage_key("derive", {"keep_layers": keep_layers}, {"target": target}))
    with stage_lock(out):
        if not _done(out):
            layer_prune_to_dir(target, out, keep_layers=keep_layers, overwrite=True)
    return str(out)


@task(name="train-drafter", cache_key_fn=_key_fn("train", ("init", "data")), **_COMMON)
def train_task(init: str, data: str, max_steps: int, batch_size: int, seq_len: int, lr: float,
               threads: int = 1, seed: int = 0) -> str:
    from sd2.config import TrainConfig
    from sd2.train import train

    key = stage_key("train", dict(max_steps=max_steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                  threads=threads, seed=seed), {"init": init, "data": data})
    out = stage_dir("train", key)
    with stage_lock(out):
        if not _done(out):
            with gpu_slot():
                train(TrainConfig(init=init, data=data, out=out, max_steps=max_steps, batch_size=batch_size,
                                  seq_len=seq_len, lr=lr, threads=threads, seed=seed, save_steps=max(max_steps, 1),
                                  overwrite=True), progress=False)
    return str(out)


@task(name="prune", cache_key_fn=_key_fn("prune", ("model", "calib")), **_COMMON)
def prune_task(model: str, method: str, pattern: str, sparsity: float, calib: str, calib_samples: int,
               seq_len: int, threads: int = 1) -> str:
    from sd2.prune import prune_to_dir

    key = stage_key("prune", dict(method=method, pattern=pattern, sparsity=sparsity, calib_samples=calib_samples,
                                  seq_len=seq_len, threads=threads), {"model": model, "calib": calib})
    out = stage_dir("prune", key)
    with stage_lock(out):
        if not _done(out):
            with gpu_slot():
                prune_to_dir(model, method, out, sparsity=None if pattern != "unstructured" else sparsity,
                             pattern=pattern, calib=calib, calib_samples=calib_samples, seq_len=seq_len,
                             threads=threads, overwrite=True, progress=False)
    return str(out)


@task(name="layer-prune-matched", cache_key_fn=_key_fn("layers", ("model", "reference", "calib")), **_COMMON)
def layer_match_task(model: str, reference: str, calib: str, calib_samples: int, seq_len: int,
                     strategy: str = "angular") -> str:
    from sd2.prune.layers import layer_prune_to_dir

    key = stage_key("layers", dict(calib_samples=calib_samples, seq_len=seq_len, strategy=strategy),
                    {"model": model, "reference": reference, "calib": calib})
    out = stage_dir("layers", key)
    with stage_lock(out):
        if not _done(out):
            layer_prune_to_dir(model, out, match_macs=reference, strategy=strategy, calib=calib,
                               calib_samples=calib_samples, seq_len=seq_len, overwrite=True)
    return str(out)


_EVAL_OPTIONS = ("uag", "replay_gammas", "replay_limit")


def _eval_config(p: dict) -> dict:
    """The eval key's config: options at their defaults are left out, so adding one keeps older keys valid."""
    return {**{k: p[k] for k in ("limit", "gamma", "max_new_tokens", "threads", "temperature", "seed", "nonce")},
            **{k: p[k] for k in _EVAL_OPTIONS if p[k]}}


@task(name="evaluate", cache_key_fn=_key_fn("eval", ("target", "drafter", "prompts"), _eval_config), **_COMMON)
def eval_task(target: str, drafter: str, prompts: str | None, limit: int, gamma: int, max_new_tokens: int,
              threads: int = 1, temperature: float = 0.0, seed: int = 0, nonce: str = "", uag: bool = False,
              replay_gammas: list[int] | None = None, replay_limit: int | None = None) -> str:
    """Evaluates one drafter; returns a dir holding eval.json and records.csv. A `nonce` forces new timings."""
    from sd2.config import EvalConfig
    from sd2.evaluate import run_eval, write_json

    params = dict(limit=limit, gamma=gamma, max_new_tokens=max_new_tokens, threads=threads, temperature=temperature,
                  seed=seed, nonce=nonce, uag=uag, replay_gammas=replay_gammas, replay_limit=replay_limit)
    opts = {k: params[k] for k in _EVAL_OPTIONS if params[k]}
    key = stage_key("eval", _eval_config(params), {"target": target, "drafter": drafter, "prompts": prompts})
    out = stage_dir("eval", key)
    with stage_lock(out):
        if not _done(out):
            with gpu_slot():
                res, df = run_eval(EvalConfig(target=target, drafter=drafter, prompts=prompts, limit=limit, gamma=gamma,
                                              max_new_tokens=max_new_tokens, threads=threads, temperature=temperature,
                                              seed=seed, **opts), progress=False)
            tmp = out.with_name(out.name + ".tmp")
            with writing(tmp, out):  # like every other stage output: no half-written dir, one clear disk error
                tmp.mkdir(parents=True, exist_ok=True)
                df.to_csv(tmp / "records.csv", index=False)
                write_json(res, tmp / "eval.json")
                tmp.rename(out)
    return str(out)
