"""One task per pipeline stage. Each output lives at SD2_HOME/artifacts/<stage>/<key>, where the key hashes
the inputs' *content* (model and data digests, the config): a re-run with the same inputs reuses the
result, through Prefect's cache or, if that cache is gone, by finding the finished directory."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import task
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel

from sd2.config import (
    DistillConfig, DistillSettings, EvalConfig, EvalOptions, LayerPruneSettings, PruneSettings, TrainConfig,
    TrainSettings,
)
from sd2.data import is_seed_mix, mix_digest
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
    if is_seed_mix(str(path_or_spec)):  # several seed sources in one string: the spec and each file's bytes
        return mix_digest(str(path_or_spec))
    return model_digest(str(path_or_spec))


def stage_key(stage: str, config: dict, inputs: dict) -> str:
    """sha256 of the stage name, its config and the content digests of its inputs."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": {k: _digest(v) for k, v in inputs.items()
                                                                      if v is not None}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stage_dir(stage: str, key: str) -> Path:
    return sd2_home() / "artifacts" / stage / key


def _generation_key(out: Path) -> str:
    """The generation of an output dir (a uuid in `<dir>.gen`), drawn anew whenever the dir is not complete."""
    gen = out.with_name(out.name + ".gen")
    if not (_done(out) and gen.exists()):
        out.parent.mkdir(parents=True, exist_ok=True)
        gen.write_text(uuid.uuid4().hex)
    return gen.read_text().strip()


def numeric_key(device: str = "auto", dtype: str = "auto") -> dict:
    """What a placement adds to a stage's key: nothing for the CPU's fp32, else the resolved device type and
    dtype (a bf16 GPU run is another result than a CPU fp32 one; `auto` is resolved, so it keys what ran)."""
    from sd2.device import plan, visible_gpus

    where = plan(device, dtype, visible_gpus())
    kind = "cuda" if where.is_cuda else "cpu"
    return {} if (kind, where.dtype) == ("cpu", "float32") else {"numeric": f"{kind}-{where.dtype}"}


def _key_config(config: dict) -> dict:
    """A stage's config as it enters its key: settings objects as their fields, with device and dtype replaced by
    the resolved numeric placement (numeric_key)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
            v.update(numeric_key(v.pop("device", "auto"), v.pop("dtype", "auto")))
        out[k] = v
    return out


def stage(name: str, inputs: tuple[str, ...], gpu: bool = True, title: str | None = None):
    """Make `fn(out, **params)` a cached, locked, idempotent pipeline stage (a Prefect task).

    The key (one source of truth) hashes the stage name, its config — every parameter that is not an input
    path, defaults included — and the content digests of its inputs; the output dir is
    SD2_HOME/artifacts/<name>/<key>. The task computes the dir at most once (a file lock serialises sweeps that
    share it; a finished dir is reused), holding a `gpu` slot while it works. Prefect's cache key is the content
    key plus the dir's generation, so a record that outlived its output (deleted by hand, disk cleaned) is never
    served: the task runs and rebuilds the dir, and its record, stored under the new generation, is served
    from then on. Returns the output dir as a string."""
    def deco(fn):
        sig = inspect.signature(fn)
        sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "out"])

        def bound(args, kwargs) -> dict:
            b = sig.bind(*args, **kwargs)
            b.apply_defaults()  # the output dir's key includes defaulted arguments too
            return dict(b.arguments)

        def key_of(params: dict) -> str:
            config = {k: v for k, v in params.items() if k not in inputs}
            return stage_key(name, _key_config(config), {k: params.get(k) for k in inputs})

        @functools.wraps(fn)
        def run(*args, **kwargs) -> str:
            params = bound(args, kwargs)
            out = stage_dir(name, key_of(params))
            with stage_lock(out):
                if not _done(out):
                    with gpu_slot() if gpu else nullcontext():
                        fn(out, **params)
            return str(out)

        run.__signature__ = sig

        def cache_key(ctx, params) -> str:
            key = key_of(bound((), params))
            return f"{key}-{_generation_key(stage_dir(name, key))}"

        return task(name=title or name, cache_key_fn=cache_key, **_COMMON)(run)
    return deco


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


def forward_sd2_logs() -> None:
    """Send the sd2 library's log lines (stage progress, what a stage chose) to the Prefect API as the logs of the
    task or flow run that wrote them, so the UI shows where a 40-minute stage is. Prefect sends only its own run
    loggers by default; outside a run the lines stay local (no warning per line). Idempotent."""
    import logging

    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("sd2")
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        return
    handler = APILogHandler(level=logging.INFO)
    handler.addFilter(lambda record: TaskRunContext.get() is not None or FlowRunContext.get() is not None)
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


forward_sd2_logs()

_COMMON = dict(persist_result=True, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
               log_prints=True)


@stage("distill", inputs=("target", "prompts"), title="self-distill")
def distill_task(out: Path, target: str, prompts: str, settings: DistillSettings) -> None:
    """Self-distilled dataset of the target's answers to the seed prompts."""
    from sd2.distill import distill

    distill(DistillConfig(target=target, prompts=prompts, out=out, overwrite=True, **settings.model_dump()),
            progress=False)


@stage("derive", inputs=("target",), gpu=False, title="derive-drafter")
def derive_task(out: Path, target: str, settings: LayerPruneSettings) -> None:
    """A drafter derived from the target by keeping some of its layers (a copy of weights: on the CPU)."""
    from sd2.prune.layers import layer_prune_to_dir

    layer_prune_to_dir(target, out, overwrite=True, **settings.model_dump(exclude={"device"}), device="cpu")


@stage("train", inputs=("init", "data", "extra_data"), title="train-drafter")
def train_task(out: Path, init: str, data: str, settings: TrainSettings, extra_data: str | None = None) -> None:
    """The drafter fine-tuned on distilled data (a sparse init keeps its masks), plus `extra_data` if given."""
    from sd2.train import train

    train(TrainConfig(init=init, data=data, out=out, overwrite=True, extra_data=[extra_data] if extra_data else [],
                      **settings.model_dump()), progress=False)


@stage("prune", inputs=("model", "calib"), title="prune")
def prune_task(out: Path, model: str, calib: str | None, settings: PruneSettings) -> None:
    """One sweep cell's one-shot pruning (N:M patterns imply their sparsity)."""
    from sd2.prune import prune_to_dir

    opts = settings.model_dump(exclude={"method"})
    if settings.pattern != "unstructured":
        opts["sparsity"] = None
    prune_to_dir(model, settings.method, out, calib=calib, overwrite=True, progress=False, **opts)


@stage("layers", inputs=("model", "reference", "calib"), title="layer-prune-matched")
def layer_match_task(out: Path, model: str, reference: str, calib: str, settings: LayerPruneSettings) -> None:
    """A layer-pruned drafter with the MACs of `reference` (the baseline a sparse cell is compared with)."""
    from sd2.prune.layers import layer_prune_to_dir

    layer_prune_to_dir(model, out, match_macs=reference, calib=calib, overwrite=True,
                       **settings.model_dump(exclude={"keep_layers", "num_layers"}))


@stage("eval", inputs=("target", "drafter", "prompts"), title="evaluate")
def eval_task(out: Path, target: str, drafter: str, prompts: str | None, options: EvalOptions,
              nonce: str = "") -> None:
    """One drafter evaluated against the target: a dir holding eval.json and records.csv. A `nonce` forces new
    timings."""
    from sd2.evaluate import run_eval
    from sd2.io import publish_dir, write_json

    res, df = run_eval(EvalConfig(target=target, drafter=drafter, prompts=prompts, **options.model_dump()),
                       progress=False)
    with publish_dir(out) as tmp:  # like every other stage output: no half-written dir, one clear disk error
        df.to_csv(tmp / "records.csv", index=False)
        write_json(res, tmp / "eval.json")
