"""The `sd2` command. Bad input → one line on stderr and exit code 2; nothing written."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sd2.config import DEFAULT_TARGET, FAST_PATHS, METHODS
from sd2.errors import UserError, storage_error

# --device / --dtype of every stage (sd2.device.plan decides what they mean)
DeviceOption = Annotated[str, typer.Option(help="auto (first GPU, else CPU) | cpu | cuda | cuda:N")]
DTypeOption = Annotated[str, typer.Option(help="auto (bf16 on a GPU, fp32 on the CPU) | bfloat16 | float16 | float32")]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-distilled sparse drafters for speculative decoding.")


def _cli(fn):
    """Run a command body, turning UserError into one line + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
        logging.getLogger("sd2").setLevel(logging.INFO)  # our progress lines; not every HTTP request of httpx
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"sd2: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # disk full / permission denied, whichever library raised it: one line
            err = storage_error(exc, kwargs.get("out"))
            if err is None:
                raise
            where = err.filename or "a file under the output or cache dirs"
            typer.echo(f"sd2: error: {where}: {err.strerror}; free space or fix permissions and re-run "
                       "(finished work is kept and resumed)", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("eval")
@_cli
def eval_cmd(
    drafter: str = typer.Option(..., help="drafter model SPEC (alias, HF dir or hub id)"),
    out: Path = typer.Option(..., help="where to write the JSON result"),
    target: str = typer.Option(DEFAULT_TARGET, help="target model SPEC"),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts (default: Spec-Bench in the data dir)"),
    categories: Optional[str] = typer.Option(None, help="comma-separated categories"),
    limit: Optional[int] = typer.Option(None, help="number of prompts, taken in turn from each category"),
    gamma: int = typer.Option(4, help="draft tokens per verification"),
    max_new_tokens: int = typer.Option(128),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch threads (pin for comparable timings)"),
    uag: bool = typer.Option(False, help="allow a drafter with another tokenizer"),
    context: int = typer.Option(256, help="context length for attention MACs"),
    fast_path: str = typer.Option("auto", help="numeric path: " + " | ".join(FAST_PATHS) + " (auto: lean engine with "
                                  "fp16 weights (sd2's C kernel) on the CPU, HF modules on a GPU; none: HF modules)"),
    allow_pickle: bool = typer.Option(False, help="allow loading pickle (.bin) weights"),
    trust_remote_code: bool = typer.Option(False),
    records: bool = typer.Option(True, help="also write per-prompt records beside --out (.records.csv)"),
    replay_gammas: Optional[str] = typer.Option(
        None, help="e.g. 2,4,6: greedy MAL at these γ too, by exact replay (one drafter pass per prompt)"),
    replay_limit: Optional[int] = typer.Option(None, help="prompts for the replay (default: the evaluated ones)"),
    draft_threshold: Optional[float] = typer.Option(
        None, help="dynamic draft length: stop drafting when the drafter's top-1 probability < this (0-1)"),
    lookup: int = typer.Option(0, help="prompt lookup in front of the drafter: copy what followed the context's last "
                               "n >= LOOKUP tokens where they occurred before (1-4; 0 = off)"),
    shared_kv: str = typer.Option("auto", help="the drafter reads the target's KV cache: auto (when it was trained "
                                  "so) | on | off"),
    prompt_vocab: bool = typer.Option(False, help="a compact draft head also scores the prompt's own tokens (rows of "
                                      "the target's head, counted in c; lossless)"),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """Speculative decoding of every prompt with the drafter, and target-only decoding, in one process."""
    from sd2.config import EvalConfig, ModelLoadOptions
    from sd2.evaluate import run_eval
    from sd2.io import write_json
    from sd2.report import eval_table

    cfg = EvalConfig.build(target=target, drafter=drafter, prompts=prompts, categories=categories, limit=limit,
                           gamma=gamma, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           threads=threads, uag=uag, context=context, fast_path=fast_path,
                           replay_gammas=replay_gammas, replay_limit=replay_limit, device=device, dtype=dtype,
                           draft_threshold=draft_threshold, lookup=lookup, shared_kv=shared_kv,
                           prompt_vocab=prompt_vocab,
                           load=ModelLoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a .json file path")
    res, df = run_eval(cfg)
    write_json(res, out)
    if records:
        df.to_csv(out.with_suffix(".records.csv"), index=False)
    typer.echo(eval_table(res))
    typer.echo(f"wrote {out}")


@app.command("distill")
@_cli
def distill_cmd(
    prompts: str = typer.Option(..., help="seed JSONL file or HF dataset id"),
    out: Path = typer.Option(..., help="output dataset dir (datasets.load_from_disk)"),
    target: str = typer.Option(DEFAULT_TARGET, help="target model SPEC"),
    mode: str = typer.Option("regenerate", help="regenerate | rewrite | reference (seed answers, no generation)"),
    limit: Optional[int] = typer.Option(None, help="number of seed records"),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(8),
    shard_size: int = typer.Option(64, help="prompts per resumable shard"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
    backend: str = typer.Option("hf", help="hf (in-process) | openai (an OpenAI-compatible server)"),
    base_url: list[str] = typer.Option([], help="server URL; repeat for data-parallel servers"),
    api_key_env: Optional[str] = typer.Option(None, help="env var that holds the API key"),
    concurrency: int = typer.Option(8, help="concurrent requests (openai)"),
    api: str = typer.Option("chat", help="chat | completions (openai)"),
    served_model: Optional[str] = typer.Option(None, help="model name on the server (default: --target)"),
    fast_path: str = typer.Option("none", help="none | fp16 (CPU: fp16 weights in sd2's kernel, faster generation)"),
    workers: int = typer.Option(1, help="generation processes over disjoint shards (hf backend; on a GPU node "
                                "--device cuda uses one per visible GPU)"),
    store_topk: int = typer.Option(0, help="keep the target's top-k logits per generated token for KD (0 = off)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="skip seeds with longer (chat-templated) prompts"),
    magpie_openers: str = typer.Option("none", help="none | tasks: magpie seeds started from sd2's task openers "
                                       "(code, translation, summary, …) that the target completes"),
    allow_pickle: bool = typer.Option(False),
    trust_remote_code: bool = typer.Option(False),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """Self-data distillation: the target answers the seed prompts itself. Re-run the same command to resume."""
    from sd2.config import DistillConfig, ModelLoadOptions
    from sd2.distill import distill

    cfg = DistillConfig.build(target=target, prompts=prompts, out=out, mode=mode, limit=limit,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, shard_size=shard_size,
                              temperature=temperature, seed=seed, threads=threads, overwrite=overwrite,
                              backend=backend, base_urls=base_url, api_key_env=api_key_env, concurrency=concurrency,
                              api=api, served_model=served_model, workers=workers, device=device, dtype=dtype,
                              fast_path=fast_path, store_topk=store_topk,
                              max_prompt_tokens=max_prompt_tokens, magpie_openers=magpie_openers,
                              load=ModelLoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    path = distill(cfg)
    manifest = json.loads((path / "sd2_manifest.json").read_text())
    typer.echo(f"wrote {path}: {json.dumps(manifest['counts'])}")


@app.command("train")
@_cli
def train_cmd(
    init: str = typer.Option(..., help="drafter to start from (model SPEC; its zeros are kept), or the target with "
                             "--feature-drafter"),
    data: Path = typer.Option(..., help="dataset dir from `sd2 distill`"),
    out: Path = typer.Option(..., help="output model dir"),
    extra_data: Optional[list[Path]] = typer.Option(None, help="more dataset dirs to train on (repeatable)"),
    max_steps: int = typer.Option(200),
    lr: float = typer.Option(1e-4),
    batch_size: int = typer.Option(8),
    grad_accum: int = typer.Option(1),
    seq_len: int = typer.Option(512),
    warmup_ratio: float = typer.Option(0.05),
    weight_decay: float = typer.Option(0.0),
    packing: bool = typer.Option(False, help="pack examples into seq-len blocks"),
    loss: str = typer.Option("sft", help="sft | kd (distill the target's logits)"),
    kd_target: Optional[str] = typer.Option(None, help="teacher for --loss kd (default: the data's target)"),
    kd_divergence: str = typer.Option("fkl", help="fkl | tv"),
    kd_teacher: str = typer.Option("auto", help="auto | stored (top-k logits kept by distill --store-topk) | live"),
    draft_vocab: int = typer.Option(0, help="compact head over the K most frequent tokens of the data (0 = full)"),
    layer_kd: float = typer.Option(0.0, help="weight of a per-layer hidden-state loss against the teacher "
                                   "(drafters as deep as the target; 0 = off)"),
    freeze_embeddings: bool = typer.Option(False, help="keep the input embeddings fixed"),
    shared_kv: bool = typer.Option(False, help="train the drafter (a pruned copy of the target) to read the "
                                   "target's KV cache, as sd2's engine then runs it"),
    shared_kv_rounds: int = typer.Option(1, help="--shared-kv: positions per training draft round (γ: every draft "
                                         "step as the engine runs it; 1: the first only)"),
    feature_drafter: bool = typer.Option(False, help="EAGLE-style drafter reading the target's hidden states "
                                         "(--init is then the target)"),
    feature_layer: int = typer.Option(-1, help="feature drafter: target layer its layers are copied from"),
    feature_layers: int = typer.Option(1, help="feature drafter: decoder layers"),
    feature_reads: str = typer.Option("-1", help="feature drafter: target layers it reads, e.g. '4,15,-1' "
                                      "(-1 = the final normed state)"),
    feature_weight: float = typer.Option(1.0, help="feature drafter: weight of the feature-regression loss"),
    feature_noise: float = typer.Option(0.0, help="feature drafter: noise std on input features in training"),
    feature_unroll: bool = typer.Option(False, help="feature drafter: train the second draft step on its own feature"),
    feature_freeze: bool = typer.Option(False, help="feature drafter: keep its embeddings and head (the target's)"),
    feature_dtype: str = typer.Option("auto", help="feature drafter: precision of the target's feature pass "
                                      "(auto | float32 | bfloat16)"),
    curve_dir: Optional[Path] = typer.Option(None, help="also write the drafter at every save step here"),
    save_steps: int = typer.Option(100, help="checkpoint every N steps"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint of an unfinished run"),
    deepspeed: Optional[Path] = typer.Option(None, help="DeepSpeed config, e.g. infra/deepspeed/zero2.json"),
    num_gpus: int = typer.Option(1, help="ranks to launch (>1: torchrun subprocess)"),
    cpu_fallback: bool = typer.Option(False, help="with fewer GPUs than --num-gpus, use CPU ranks (gloo)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """Fine-tune a drafter on distilled data (DeepSpeed ZeRO when configured); sparsity masks are kept exactly."""
    from sd2.config import TrainConfig
    from sd2.train import train

    cfg = TrainConfig.build(init=init, data=data, out=out, extra_data=extra_data or [], max_steps=max_steps, lr=lr,
                            batch_size=batch_size,
                            grad_accum=grad_accum, seq_len=seq_len, warmup_ratio=warmup_ratio,
                            weight_decay=weight_decay, packing=packing, loss=loss, kd_target=kd_target,
                            kd_divergence=kd_divergence, kd_teacher=kd_teacher, draft_vocab=draft_vocab,
                            layer_kd=layer_kd, freeze_embeddings=freeze_embeddings, shared_kv=shared_kv,
                            shared_kv_rounds=shared_kv_rounds, curve_dir=curve_dir,
                            save_steps=save_steps,
                            feature_drafter=feature_drafter, feature_layer=feature_layer,
                            feature_layers=feature_layers, feature_unroll=feature_unroll,
                            feature_reads=feature_reads, feature_dtype=feature_dtype, feature_freeze=feature_freeze,
                            feature_weight=feature_weight, feature_noise=feature_noise, resume=resume,
                            deepspeed=deepspeed,
                            num_gpus=num_gpus, cpu_fallback=cpu_fallback, seed=seed, threads=threads,
                            overwrite=overwrite, device=device, dtype=dtype)
    path = train(cfg)
    info = json.loads((path / "sd2_train.json").read_text())
    typer.echo(f"wrote {path}: {info['global_step']} steps, train loss {info['train_loss']:.4f}, "
               f"{info['train_tokens_per_s'] or 0:.0f} tokens/s")


@app.command("macs")
@_cli
def macs_cmd(
    model: str = typer.Option(..., help="model SPEC"),
    context: int = typer.Option(256, help="context length for attention MACs"),
    out: Optional[Path] = typer.Option(None, help="also write the JSON here"),
):
    """MACs per token, counting only nonzero linear weights."""
    from sd2.io import write_json
    from sd2.metrics import macs_per_token
    from sd2.models import load_model

    if context < 0:
        raise UserError("--context: must be >= 0")
    m, _ = load_model(model, with_tokenizer=False)
    res = {"model": model, **macs_per_token(m, context)}
    if out:
        write_json(res, out)
    typer.echo(json.dumps(res, indent=2))


@app.command("prune")
@_cli
def prune_cmd(
    model: str = typer.Option(..., help="model SPEC to prune"),
    method: str = typer.Option(..., help=" | ".join(METHODS)),
    out: Path = typer.Option(..., help="output model dir (+ sparsity.json)"),
    sparsity: Optional[float] = typer.Option(None, help="share of weights to zero, in [0, 1) (implied by N:M)"),
    pattern: str = typer.Option("unstructured", help="unstructured | N:M such as 2:4"),
    calib: Optional[Path] = typer.Option(None, help="distilled dataset dir or prompts JSONL (sparsegpt, wanda)"),
    calib_samples: int = typer.Option(32, help="calibration samples"),
    seq_len: int = typer.Option(256, help="tokens per calibration sample"),
    layer_filter: str = typer.Option(r"(self_attn|mlp)\.\w+_proj$", "--filter", help="regex on decoder linear names"),
    allocation: str = typer.Option("uniform", help="uniform | owl (per-layer sparsity from activation outliers, "
                                   "same mean)"),
    owl_lambda: float = typer.Option(0.08, help="owl: layer sparsities span sparsity ± lambda"),
    owl_m: float = typer.Option(5.0, help="owl: a score is an outlier above M × its layer's mean"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """One-shot pruning of the decoder's linear layers; writes zeros in place (plain safetensors)."""
    from sd2.prune import prune_to_dir

    meta = prune_to_dir(model, method, out, sparsity=sparsity, pattern=pattern, calib=calib,
                        calib_samples=calib_samples, seq_len=seq_len, layer_filter=layer_filter, seed=seed,
                        threads=threads, overwrite=overwrite, device=device, dtype=dtype, allocation=allocation,
                        owl_lambda=owl_lambda, owl_m=owl_m)
    typer.echo(f"{method} {pattern} → sparsity {meta['sparsity']:.4f} over {len(meta['layers'])} layers "
               f"in {meta['seconds']:.1f}s → {out}")


@app.command("layer-prune")
@_cli
def layer_prune_cmd(
    model: str = typer.Option(..., help="model SPEC"),
    out: Path = typer.Option(..., help="output model dir"),
    keep_layers: Optional[str] = typer.Option(None, help="layers to keep, e.g. '0-9,29'"),
    num_layers: Optional[int] = typer.Option(None, help="layers the pruned model keeps"),
    strategy: str = typer.Option("angular", help="angular (drop the most redundant block) | first"),
    match_macs: Optional[str] = typer.Option(None, help="pick --num-layers so MACs/token match this model"),
    calib: Optional[Path] = typer.Option(None, help="distilled dataset dir or prompts JSONL (angular)"),
    calib_samples: int = typer.Option(16),
    seq_len: int = typer.Option(256),
    context: int = typer.Option(256, help="context length for --match-macs MACs"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """Drop decoder layers: an explicit list, or K layers chosen by strategy (optionally K matched on MACs)."""
    from sd2.prune.layers import layer_prune_to_dir

    info = layer_prune_to_dir(model, out, keep_layers=keep_layers, num_layers=num_layers, strategy=strategy,
                              match_macs=match_macs, calib=calib, calib_samples=calib_samples, seq_len=seq_len,
                              context=context, seed=seed, overwrite=overwrite, device=device, dtype=dtype)
    typer.echo(f"kept {len(info['kept_layers'])} of {info['source_layers']} layers {info['kept_layers']} → {out}")


LEASES = "prefect.server.concurrency.lease_storage.filesystem"


def _orchestration_env() -> None:
    """Defaults for the embedded mode (no PREFECT_API_URL): a patient ephemeral-API start-up, Prefect results
    beside sd2's own artifacts, and the servers of a running `sd2 ui` when there is one."""
    import os

    from sd2.models import sd2_home

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(sd2_home() / "prefect-results"))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ui = _ui_state_file()
    if ui.exists():
        state = json.loads(ui.read_text())
        if _alive(state.get("pids", [])):
            os.environ.setdefault("PREFECT_API_URL", state["prefect_api_url"])
            os.environ.setdefault("MLFLOW_TRACKING_URI", state["mlflow_url"])
    api = os.environ.get("PREFECT_API_URL")
    if api:
        import urllib.request

        try:
            urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5)
        except OSError as exc:
            raise UserError(f"PREFECT_API_URL {api}: unreachable ({exc}); start the server (`sd2 ui`) or unset it "
                            "to use Prefect's embedded API") from None
    from sd2.tracking import check_reachable

    check_reachable()


def _ui_state_file() -> Path:
    from sd2.tracking import runs_dir

    return runs_dir() / "ui.json"


def _alive(pids: list[int]) -> bool:
    import os

    try:
        for pid in pids:
            os.kill(pid, 0)
        return bool(pids)
    except OSError:
        return False


def _print_compare(parent: str | None = None, experiment: str | None = None, fmt: str = "table") -> None:
    from sd2.tracking import compare

    from sd2.report import terminal_table

    if fmt not in ("table", "csv", "json"):
        raise UserError(f"--format {fmt!r}: use table, csv or json")
    df = compare(experiment, parent)
    cols = ["drafter", "mal", "mal_ci95_lo", "mal_ci95_hi", "acceptance_rate", "drafter_macs_per_token",
            "cost_ratio", "weight_bytes_ratio", "theoretical_speedup", "drafter_time_ratio", "verify_cost_ratio",
            "predicted_speedup", "speedup", "lossless", "run_id"]
    view = df[[c for c in cols if c in df.columns]]
    if fmt == "csv":
        typer.echo(view.to_csv(index=False).rstrip())
    elif fmt == "json":
        typer.echo(view.to_json(orient="records", indent=2))
    else:
        typer.echo(terminal_table(view))


def _failed_cells_exit(exc) -> None:
    """Failed sweep cells: the table of what finished was printed; one line naming the cells, exit 1."""
    typer.echo(f"sd2: error: {exc}", err=True)
    raise typer.Exit(1)


def _run_pipeline(cfg) -> None:
    import time

    from flows.pipeline import CellsFailed, sd2_pipeline
    from sd2 import tracking

    t0 = time.perf_counter()
    failed = None
    try:
        sd2_pipeline(cfg)
    except CellsFailed as exc:
        failed = exc
    typer.echo(f"\npipeline finished in {time.perf_counter() - t0:.0f}s; drafters (best theoretical speedup first):")
    _print_compare(experiment=tracking.experiment_name(cfg.target))
    uri = tracking.tracking_uri()
    typer.echo(f"\nbrowse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1   (or `sd2 ui` for both servers)"
               if not uri.startswith("http") else f"\nbrowse: {uri}")
    if failed is not None:
        _failed_cells_exit(failed)


@app.command("demo")
@_cli
def demo_cmd(
    profile: str = typer.Option("quick", help="quick (≈10 min on 2 CPU cores) | full (longer, better)"),
    target: str = typer.Option(DEFAULT_TARGET, help="target model SPEC"),
):
    """The whole pipeline on the real SmolLM2 target: distill → train → prune sweep → baselines → evaluate → MLflow."""
    from sd2.config import PipelineConfig, SweepGrid

    _orchestration_env()
    if profile not in ("quick", "full"):
        raise UserError(f"--profile {profile!r}: use quick or full")
    sweep = SweepGrid() if profile == "quick" else SweepGrid(methods=["sparsegpt", "wanda"],
                                                             patterns=["unstructured", "2:4"],
                                                             sparsities=[0.3, 0.5, 0.7])
    _run_pipeline(PipelineConfig.build(name=f"sd2-demo-{profile}", profile=profile, target=target, sweep=sweep))


@app.command("pipeline")
@_cli
def pipeline_cmd(config: Path = typer.Option(..., help="YAML file of PipelineConfig fields")):
    """Run sd2_pipeline with a config file (the same fields as the Prefect UI form)."""
    import yaml

    from sd2.config import PipelineConfig

    if not config.is_file():
        raise UserError(f"--config {config}: file not found")
    try:
        values = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {config}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {config}: expected a mapping of PipelineConfig fields, got {type(values).__name__}")
    try:
        cfg = PipelineConfig.build(**values)
    except UserError as exc:
        raise UserError(f"--config {config}: {exc}") from None
    _orchestration_env()  # after the checks: a bad value never waits for a server
    _run_pipeline(cfg)


@app.command("sweep")
@_cli
def sweep_cmd(
    drafter: str = typer.Option(..., help="dense drafter dir to prune"),
    data: Path = typer.Option(..., help="distilled dataset dir (calibration + sparse fine-tuning)"),
    target: str = typer.Option(DEFAULT_TARGET, help="target model SPEC"),
    methods: str = typer.Option("sparsegpt", help="comma-separated: sparsegpt,wanda,magnitude"),
    patterns: str = typer.Option("unstructured", help="comma-separated: unstructured,2:4"),
    sparsities: str = typer.Option("0.5", help="comma-separated unstructured sparsities"),
    allocation: str = typer.Option("uniform", help="uniform | owl: per-layer sparsity of the unstructured cells"),
    owl_lambda: float = typer.Option(0.08, help="owl: layer sparsities span sparsity ± lambda"),
    ft_steps: int = typer.Option(30, "--sparse-ft-steps", "--ft-steps", help="sparse fine-tuning steps per cell"),
    eval_limit: int = typer.Option(8),
    gamma: int = typer.Option(4),
    threads: int = typer.Option(1),
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
):
    """A sparsity sweep (prune → sparse fine-tune → evaluate) logged to MLflow as one parent run."""
    from sd2.config import EvalSettings, SweepConfig, SweepGrid

    try:
        values = [float(x) for x in sparsities.split(",") if x.strip()]
    except ValueError as exc:
        raise UserError(f"--sparsities: {exc}; give numbers in [0, 1) such as 0.3,0.5") from None
    grid = SweepGrid.build(methods=[m for m in methods.split(",") if m],
                           patterns=[p for p in patterns.split(",") if p], sparsities=values,
                           allocation=allocation, owl_lambda=owl_lambda)
    cfg = SweepConfig.build(target=target, drafter=drafter, data=str(data), sweep=grid, sparse_ft_steps=ft_steps,
                            threads=threads, device=device, dtype=dtype,
                            eval=EvalSettings.build(target=target, limit=eval_limit, gamma=gamma, threads=threads,
                                                    device=device, dtype=dtype))
    _orchestration_env()  # after the checks: bad values never wait for a server (nor import Prefect)
    from flows.pipeline import CellsFailed, prune_sweep

    try:
        prune_sweep(cfg)
    except CellsFailed as exc:
        _print_compare()
        _failed_cells_exit(exc)
    _print_compare()


@app.command("compare")
@_cli
def compare_cmd(
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: every sd2/* experiment)"),
    parent: Optional[str] = typer.Option(None, help="only the drafters of this pipeline/sweep run"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
):
    """The drafter comparison from MLflow (search_runs)."""
    _orchestration_env()
    _print_compare(parent, experiment, fmt)


@app.command("report")
@_cli
def report_cmd(
    config: list[Path] = typer.Option(..., help="a study's pipeline config (repeatable): its latest finished run "
                                      "in MLflow is reported"),
    out: Path = typer.Option(Path("docs/results.md"), help="markdown file; PNG plots are written beside it"),
    reading: list[Path] = typer.Option([], help="markdown appended after the results, in order (repeatable): the "
                                       "reading of the results; e.g. an earlier study's tables, kept as they were"),
):
    """Tables, plots and the paper's claims checked, generated from the MLflow runs of the study pipelines."""
    import shlex

    from sd2.report import write_results

    _orchestration_env()
    cmd = "sd2 report " + " ".join([*(f"--config {shlex.quote(str(c))}" for c in config),
                                    f"--out {shlex.quote(str(out))}",
                                    *(f"--reading {shlex.quote(str(r))}" for r in reading)])
    files = write_results([str(c) for c in config], str(out), [str(r) for r in reading], command=cmd)
    for f in files:
        typer.echo(f"wrote {f}")


@app.command("export")
@_cli
def export_cmd(
    run: str = typer.Option(..., help="MLflow run id, or models:/sd2-drafter-<target>@champion"),
    out: Path = typer.Option(..., help="output HF model dir"),
    overwrite: bool = typer.Option(False),
):
    """A self-contained HF drafter dir (safetensors, tokenizer, README with metrics and lineage)."""
    from sd2.registry import export_drafter

    _orchestration_env()
    typer.echo(f"exported {export_drafter(run, out, overwrite)}")


@app.command("sync")
@_cli
def sync_cmd():
    """Send tracking calls journaled while the MLflow server was unreachable."""
    from sd2.tracking import sync

    _orchestration_env()
    typer.echo(f"sent {sync()} journaled call(s) to the tracking server")


@app.command("ui")
@_cli
def ui_cmd(
    prefect_port: int = typer.Option(4200),
    mlflow_port: int = typer.Option(5000),
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1 unless you mean to expose them)"),
):
    """Start a Prefect server and an MLflow server, and point later sd2 commands at them (./sd2-runs/ui.json)."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from sd2.tracking import local_artifact_root, runs_dir, tracking_uri

    runs = runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    # Leases of concurrency slots on disk: a server that restarts while a stage holds the `gpu` slot lets the
    # lease expire instead of leaking the slot (the default in-memory leases are lost, the slot stays taken).
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASES)
    env.pop("MLFLOW_TRACKING_URI", None)
    # The browser UI calls the API at PREFECT_UI_API_URL (else host:4200): point it at the port started here.
    prefect_env = dict(env, PREFECT_UI_API_URL=f"http://{host}:{prefect_port}/api", PREFECT_SERVER_API_HOST=host,
                       PREFECT_SERVER_API_PORT=str(prefect_port))
    prefect_env.pop("PREFECT_API_URL", None)
    store = tracking_uri() if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http") else \
        f"sqlite:///{(runs / 'mlflow.db').resolve()}"
    # Artifacts of runs made through the server land beside those of the embedded default (sd2-runs/artifacts).
    artifacts = local_artifact_root() if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith("http") else None
    artifacts = artifacts or runs / "artifacts"
    bindir = Path(sys.executable).parent
    logs = {n: open(runs / f"{n}.log", "a") for n in ("prefect", "mlflow")}
    procs = [
        subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                         stdout=logs["prefect"], stderr=subprocess.STDOUT, env=prefect_env, start_new_session=True),
        subprocess.Popen([str(bindir / "mlflow"), "server", "--backend-store-uri", store, "--host", host, "--port",
                          str(mlflow_port), "--workers", "1", "--artifacts-destination",
                          str(artifacts)],
                         stdout=logs["mlflow"], stderr=subprocess.STDOUT, env=env, start_new_session=True),
    ]
    urls = {"prefect_api_url": f"http://{host}:{prefect_port}/api", "prefect_ui": f"http://{host}:{prefect_port}",
            "mlflow_url": f"http://{host}:{mlflow_port}", "pids": [p.pid for p in procs]}
    for name, url in (("prefect", urls["prefect_api_url"] + "/health"), ("mlflow", urls["mlflow_url"] + "/health")):
        for _ in range(180):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if any(p.poll() is not None for p in procs):
                    raise UserError(f"{name} server exited; see {runs / (name + '.log')}")
                time.sleep(1)
    _ui_state_file().write_text(json.dumps(urls, indent=2))
    typer.echo(f"Prefect UI  {urls['prefect_ui']}\nMLflow UI   {urls['mlflow_url']}\n"
               f"later sd2 commands use them while they run (state in {_ui_state_file()}); or export\n"
               f"  PREFECT_API_URL={urls['prefect_api_url']} MLFLOW_TRACKING_URI={urls['mlflow_url']}\n"
               f"stop with: kill {' '.join(str(p.pid) for p in procs)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
