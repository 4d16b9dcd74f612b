"""The SD² pipeline as Prefect flows, each taking one pydantic config (a typed form in the Prefect UI):

    sd2_pipeline ─┬─ self_distill ─ train_drafter ─ prune_sweep ─ evaluate_drafters ─ report
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from sd2 import registry, tracking
from sd2.config import (  # noqa: F401 - SweepGrid re-exported
    DistillSettings, EvalSettings, PipelineConfig, PruneSettings, SweepConfig, SweepGrid, TrainSettings,
    resolve_train_dtype,
)
from sd2.data import data_dir
from sd2.distill import survival
from sd2.report import plot_results
from sd2.sharedkv import slice_can_read
from tasks.stages import derive_task, distill_task, eval_task, layer_match_task, prune_task, train_task


class DrafterSpec(BaseModel):
    name: str
    path: str
    params: dict = Field(default_factory=dict)


def ensure_gpu_slot() -> None:
    """Create the global concurrency limit `gpu` (one slot per GPU, one on CPU) on a Prefect server."""
    import os

    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    if not os.environ.get("PREFECT_API_URL"):
        return  # embedded API: one process, nothing to share (see tasks.stages.gpu_slot)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name("gpu")
        except Exception:  # noqa: BLE001 - ObjectNotFound
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="gpu", limit=max(1, torch.cuda.device_count())))


def _prefect_tags() -> dict:
    return {"prefect.flow_run_id": flow_run.get_id() or "",
            "prefect.flow_run_url": flow_run.get_flow_run_ui_url() or ""}


@flow(name="self-distill", log_prints=True)
def self_distill(target: str, prompts: str, settings: DistillSettings = DistillSettings()) -> str:
    """The target answers the seed prompts itself; returns the dataset dir."""
    return distill_task(target, prompts, settings)


@flow(name="train-drafter", log_prints=True)
def train_drafter(init: str, data: str, settings: TrainSettings = TrainSettings(),
                  extra_data: str | None = None) -> str:
    """Fine-tune a drafter (dense or sparse: masks are kept) on distilled data (+ `extra_data`); returns the model
    dir."""
    return train_task(init, data, settings, extra_data=extra_data)


def _run_cell(model: str, data: str, prune: PruneSettings, train: TrainSettings | None) -> dict:
    """prune → sparse fine-tune (masks kept): the body of a sweep cell, in-process or as a deployment run."""
    pruned = prune_task(model, data, prune)
    final = train_task(pruned, data, train) if train is not None else pruned
    return {"method": prune.method, "pattern": prune.pattern, "sparsity": prune.sparsity,
            "allocation": prune.allocation, "pruned": pruned, "model": final}


@flow(name="sweep-cell", log_prints=True)
def sweep_cell(model: str, data: str, prune: PruneSettings, train: TrainSettings | None = None) -> dict:
    """One cell of a sweep, runnable on its own (a deployment lets remote workers take cells)."""
    return _run_cell(model, data, prune, train)


@task(name="remote-cell", retries=1)
def _remote_cell(deployment: str, params: dict) -> dict:
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=json.loads(json.dumps(params, default=_dump)), timeout=None)
    if not run.state or not run.state.is_completed():
        p = params["prune"]
        raise RuntimeError(f"cell {p.method} {p.pattern} {p.sparsity} ended {run.state}")
    return run.state.result()


def _dump(obj):
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else str(obj)


def _cell_name(c: dict) -> str:
    owl = "-owl" if c["allocation"] != "uniform" else ""
    return f"{c['method']}-{c['pattern'].replace(':', 'of')}-{c['sparsity']:g}{owl}"


def _prune_params(c: dict) -> dict:
    return {k: c[k] for k in ("method", "pattern", "sparsity", "allocation")}


def _failed_cell(log, c: dict, exc: Exception) -> dict:
    msg = str(exc).splitlines()[0] if str(exc) else repr(exc)
    log.error("cell %s failed: %s", _cell_name(c), msg)
    return {**c, "error": msg}


class CellsFailed(RuntimeError):
    """Some sweep cells failed for a reason the form could not know (a pattern that does not divide a layer, out
    of memory, a corrupt model): the other cells finished and were logged, but the run must not look green."""

    def __init__(self, failed: list[dict]):
        self.failed = failed
        super().__init__(f"{len(failed)} sweep cell(s) failed: " + "; ".join(
            f"{_cell_name(c)}: {c['error']}" for c in failed) + " (the other drafters finished and are in MLflow)")


def _report_failed_cells(cells: list[dict]) -> None:
    """A markdown artifact listing the failed cells (shown on the flow run), then the run fails."""
    failed = [c for c in cells if "error" in c]
    if failed:
        create_markdown_artifact(key="sd2-failed-cells", description="sweep cells that failed", markdown=(
            "# Failed sweep cells\n\n" + "\n".join(f"- **{_cell_name(c)}**: {c['error']}" for c in failed)))
        raise CellsFailed(failed)


@flow(name="prune-sweep", log_prints=True)
def prune_sweep(config: SweepConfig, fail_on_failed_cells: bool = True) -> list[dict]:
    """Method × pattern × sparsity cells, one after another in this process, or fanned out as runs of the
    `sweep-cell` deployment on a work pool; an impossible cell is reported and the others still run. The run
    then ends Failed naming the failed cells (inside the pipeline, the pipeline does that at its end)."""
    log = get_run_logger()
    ensure_gpu_slot()
    cells = config.sweep.cells()
    done = []
    remote = []
    train = config.train_settings() if config.sparse_ft_steps else None
    for c in cells:
        params = dict(model=config.drafter, data=config.data, prune=config.prune_settings(c), train=train)
        if config.cell_deployment:  # cells run concurrently on the workers of a pool
            remote.append((c, _remote_cell.submit(config.cell_deployment, params)))
            continue
        # In-process cells run one after another: loading models in several threads at once is not safe in
        # transformers (process-global loading state), and on one machine they would share the device anyway.
        try:
            done.append({**c, **_run_cell(**params)})
        except Exception as exc:  # noqa: BLE001 - one bad cell must not sink the sweep
            done.append(_failed_cell(log, c, exc))
    for c, fut in remote:
        try:
            done.append(fut.result())
        except Exception as exc:  # noqa: BLE001
            done.append(_failed_cell(log, c, exc))
    if config.eval is not None:
        drafters = [DrafterSpec(name=_cell_name(r), path=r["model"],
                                params={"kind": "sparse", "prune": _prune_params(r),
                                        "init": config.drafter}) for r in done if "model" in r]
        parent = tracking.start_parent(config.eval.target, "prune-sweep", tags=_prefect_tags(),
                                       params=json.loads(config.model_dump_json()))
        try:
            evaluate_drafters(drafters, config.eval, parent_run_id=parent, dataset=config.data)
        finally:
            tracking.end_run(parent, "FAILED" if any("error" in r for r in done) else "FINISHED")
    if fail_on_failed_cells:
        _report_failed_cells(done)
    return done


@flow(name="evaluate-drafters", log_prints=True)
def evaluate_drafters(drafters: list[DrafterSpec], settings: EvalSettings, parent_run_id: str | None = None,
                      dataset: str | None = None, register_champion: bool = True, fresh: bool = False) -> list[dict]:
    """Evaluate each drafter against the target (one process each, target-only baseline included), log a child
    MLflow run per drafter, plots on the parent, the champion alias, and a table artifact linking the runs."""
    own_parent = parent_run_id is None
    if own_parent:
        parent_run_id = tracking.start_parent(settings.target, "evaluate-drafters", tags=_prefect_tags())
    rows, run_ids = [], []
    nonce = datetime.now(timezone.utc).isoformat() if fresh else ""  # a new key: fresh timings, not a cache hit
    # replayed: more γ, or the headline γ over the replay prompt set (replay_limit) — greedy, same tokenizer only
    replay = sorted({settings.gamma, *settings.eval_gammas}) if (
        (settings.eval_gammas or settings.replay_limit) and settings.eval_gamma_mode == "replay"
        and not settings.uag) else None
    for d in drafters:  # one at a time: measured speedups must not share the CPU with another evaluation
        def run(gamma: int, temperature: float = 0.0, **kw) -> Path:
            return Path(eval_task(settings.target, d.path, settings.prompts,
                                  settings.options(gamma, temperature, **kw), nonce=nonce))

        out = run(settings.gamma, **({"replay_gammas": replay, "replay_limit": settings.replay_limit}
                                     if replay else {}))
        res = json.loads((out / "eval.json").read_text())
        records = pd.read_csv(out / "records.csv")
        res["extra"] = {}
        if not replay:
            for g in settings.eval_gammas:
                if g != settings.gamma:
                    res["extra"][f"g{g}"] = _brief(run(g))
        t = settings.sampling_temperature
        if t and (not settings.sampling_drafters or d.name in settings.sampling_drafters):
            res["extra"][f"t{t:g}"] = _brief(run(settings.gamma, t))
        rid = tracking.log_drafter_run(parent_run_id, settings.target, d.name, {**d.params, "drafter_path": d.path,
                                       "gamma": settings.gamma, "eval_limit": settings.limit,
                                       "eval.numeric_path": res.get("numeric_path"),
                                       "eval.draft_threshold": settings.draft_threshold,
                                       "eval.lookup": settings.lookup, "eval.shared_kv": res.get("shared_kv"),
                                       "eval.prompt_vocab": res.get("prompt_vocab")},
                                       res, records, model_dir=d.path, dataset_dir=dataset)
        run_ids.append(rid)
        rows.append({"drafter": d.name, "kind": d.params.get("kind", ""), **{f"prune.{k}": v for k, v in
                     d.params.get("prune", {}).items()},
                     **{k: res[k] for k in ("mal", "acceptance_rate", "drafter_macs_per_token", "cost_ratio",
                                            "theoretical_speedup", "speedup", "lossless")},
                     "shared_kv": res.get("shared_kv", False),
                     "mal_ci95": f"{res['mal_ci95'][0]:.2f}–{res['mal_ci95'][1]:.2f}",
                     **{f"mal.g{g}": v["mal"] for g, v in res.get("replay", {}).get("gammas", {}).items()},
                     **{f"mal.{k}": v["mal"] for k, v in res["extra"].items()},
                     **{f"mal.{c}": v["mal"] for c, v in res["per_category"].items()}, "mlflow_run": rid})
    df = pd.DataFrame(rows)
    with tempfile.TemporaryDirectory() as tmp:
        files = plot_results(df, tmp)
        table = Path(tmp) / "comparison.csv"
        df.to_csv(table, index=False)
        tracking.log_parent_artifacts(parent_run_id, [*files, table])
    champion = registry.register_champion(settings.target, run_ids) if register_champion else None
    link = _run_link(settings.target)
    create_table_artifact(
        key="sd2-results",
        table=[{"drafter": r["drafter"], "MAL": round(r["mal"], 3), "MAL 95% CI": r["mal_ci95"],
                "acceptance": round(r["acceptance_rate"], 3),
                "MACs/token (M)": round(r["drafter_macs_per_token"] / 1e6, 2),
                "theoretical speedup": round(r["theoretical_speedup"], 3), "measured speedup": round(r["speedup"], 3),
                "lossless": r["lossless"], "MLflow run": link(r["mlflow_run"])} for r in rows],
        description=f"sd2 drafters vs {settings.target} (γ={settings.gamma}); champion: "
                    f"{champion['drafter'] if champion else '—'}; MLflow: {tracking.tracking_uri()}")
    if own_parent:
        tracking.end_run(parent_run_id)
    return rows


def _brief(eval_dir: Path) -> dict:
    """The headline numbers of one more evaluation setting, kept on the drafter's main result."""
    r = json.loads((eval_dir / "eval.json").read_text())
    return {k: r.get(k) for k in ("gamma", "temperature", "n_prompts", "max_new_tokens", "mal", "mal_ci95",
                                  "acceptance_rate", "per_position_acceptance", "cost_ratio", "theoretical_speedup",
                                  "speedup", "lossless")}


def _run_link(target: str):
    uri = tracking.tracking_uri()

    def link(run_id: str) -> str:
        if run_id.startswith(tracking.PENDING_PREFIX):
            return f"{run_id} (MLflow was unreachable: run `sd2 sync`)"
        if uri.startswith("http"):
            import mlflow

            mlflow.set_tracking_uri(uri)
            try:
                exp = mlflow.get_experiment_by_name(tracking.experiment_name(target))
                return f"[{run_id[:8]}]({uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run_id})"
            except Exception:  # noqa: BLE001 - a link is not worth failing the run
                return run_id
        return f"{run_id} (mlflow ui --backend-store-uri {uri})"
    return link


def _layer_match_cells(cells: list[dict], cfg: PipelineConfig) -> list[dict]:
    """The sparse cells layer-pruned baselines are matched to: the first method's unstructured cells at the
    configured sparsities, else the first finished cell."""
    ok = [c for c in cells if "model" in c]
    picked = [c for s in cfg.layer_match for c in ok if c["method"] == cfg.sweep.methods[0]
              and c["pattern"] == "unstructured" and abs(c["sparsity"] - s) < 1e-9]
    return picked or ok[:1]


def _same_tokenizer(a: str, b: str) -> bool:
    from sd2.models import load_tokenizer, same_tokenizer

    return same_tokenizer(load_tokenizer(a), load_tokenizer(b))


@flow(name="sd2-pipeline", log_prints=True)
def sd2_pipeline(config: PipelineConfig = PipelineConfig()) -> list[dict]:
    """The whole loop: self-distill → derived drafter → fine-tune → prune sweep + sparse FT → baselines
    (untuned, dense, layer-pruned with matched MACs) → evaluate all → MLflow + champion + artifacts."""
    cfg = config.resolved()
    ensure_gpu_slot()
    seeds = cfg.seed_prompts or str(data_dir() / "dolly-15k-subset.jsonl")
    tracking.check_reachable()
    parent = tracking.start_parent(cfg.target, cfg.name, tags=_prefect_tags(),
                                   params=json.loads(cfg.model_dump_json()))
    where = dict(device=cfg.device, dtype=cfg.dtype)
    try:
        data = self_distill(cfg.target, seeds, cfg.distill_settings())
        # what the filter kept (a base model's answers loop often): on the parent run, and in `sd2 report`
        tracking.log_parent_artifacts(parent, [], {f"distill.{k}": v for k, v in survival(data).items()})
        base_model = cfg.drafter_base or cfg.target
        # a feature drafter is built from the target inside training; other drafters start from a layer slice
        base = cfg.target if cfg.feature_drafter else derive_task(base_model, cfg.derive_settings())
        # seed answers as more training text (teacher-forced: a feature drafter learns the target's logits on it)
        extra = self_distill(cfg.target, cfg.reference_seeds, cfg.distill_settings("reference", cfg.reference_seeds)) \
            if cfg.reference_seeds else None
        # train_steps 0: the sweep prunes the derived drafter as cut (the target's own depth, made cheap by sparsity)
        dense = train_drafter(base, data, cfg.train_settings(), extra_data=extra) if cfg.train_steps else base
        cells = prune_sweep(SweepConfig(target=cfg.target, drafter=dense, data=data, sweep=cfg.sweep,
                                        calib_samples=cfg.calib_samples, seq_len=cfg.seq_len,
                                        sparse_ft_steps=cfg.sparse_ft_steps, train_batch_size=cfg.train_batch_size,
                                        lr=cfg.lr, train_loss=cfg.train_loss, packing=cfg.packing,
                                        draft_vocab=cfg.draft_vocab, layer_kd=cfg.layer_kd,
                                        shared_kv=cfg.shared_kv, shared_kv_rounds=cfg.shared_kv_rounds,
                                        train_dtype=cfg.train_dtype,
                                        threads=cfg.threads, cell_deployment=cfg.cell_deployment, **where),
                            fail_on_failed_cells=False) if cfg.prune else []
        common = {"init": base_model, "layers": "feature" if cfg.feature_drafter else cfg.drafter_layers,
                  "train.steps": cfg.train_steps,
                  "train.lr": cfg.lr, "distill.mode": cfg.distill_mode}
        common.update({"train.loss": cfg.train_loss, "draft_vocab": cfg.draft_vocab, "train.packing": cfg.packing,
                       "sparse_ft.layer_kd": cfg.layer_kd, "train.shared_kv": cfg.shared_kv,
                       "train.shared_kv_rounds": cfg.shared_kv_rounds,
                       "train.dtype": resolve_train_dtype(cfg.train_dtype, cfg.dtype, cfg.device),
                       "train.freeze_embeddings": cfg.freeze_embeddings, "distill.store_topk": cfg.distill_store_topk,
                       "distill.max_prompt_tokens": cfg.distill_max_prompt_tokens, "seed_prompts": seeds,
                       "distill.magpie_openers": cfg.magpie_openers,
                       "train.feature_drafter": cfg.feature_drafter, "train.feature_noise": cfg.feature_noise,
                       "train.feature_reads": cfg.feature_reads, "train.feature_unroll": cfg.feature_unroll,
                       "train.reference_seeds": cfg.reference_seeds})
        drafters = [DrafterSpec(name="derived-untuned", path=base, params={
            **common, "kind": "untuned", "train.steps": 0})] if cfg.untuned_baseline and not cfg.feature_drafter else []
        kind = "feature" if cfg.feature_drafter else "dense"
        if cfg.train_steps:  # untrained, it is the derived drafter (the untuned baseline when asked for)
            drafters.append(DrafterSpec(name=f"{kind}-self-distilled", path=dense, params={**common, "kind": kind}))
        if cfg.sft_baseline:  # the same drafter and budget, trained on the seed answers instead of the target's
            ref = self_distill(cfg.target, seeds, cfg.distill_settings("reference"))
            sft = train_drafter(base, ref, cfg.train_settings(loss="sft"))
            drafters.append(DrafterSpec(name="dense-plain-sft", path=sft, params={
                **common, "kind": "plain-sft", "distill.mode": "reference"}))
        for c in cells:
            if "model" in c:
                drafters.append(DrafterSpec(name=_cell_name(c), path=c["model"], params={
                    **common, "kind": "sparse", "prune": _prune_params(c),
                    "sparse_ft.steps": cfg.sparse_ft_steps}))
        if cfg.layer_baseline and cells:
            drafters += _layer_baselines(cfg, cells, dense, base_model, data, common)
        uag = base_model != cfg.target and not _same_tokenizer(base_model, cfg.target)
        settings = EvalSettings(target=cfg.target, prompts=cfg.eval_prompts, limit=cfg.eval_limit, gamma=cfg.gamma,
                                max_new_tokens=cfg.eval_max_new_tokens, threads=cfg.threads, uag=uag,
                                eval_gammas=cfg.eval_gammas, eval_gamma_mode="engine" if uag else cfg.eval_gamma_mode,
                                replay_limit=cfg.replay_limit, sampling_temperature=cfg.sampling_temperature,
                                sampling_drafters=cfg.sampling_drafters, fast_path=cfg.fast_path,
                                draft_threshold=cfg.draft_threshold, lookup=cfg.lookup, prompt_vocab=cfg.prompt_vocab,
                                **where)
        rows = evaluate_drafters(drafters, settings, parent_run_id=parent, dataset=data,
                                 register_champion=cfg.register_champion)
        _report_failed_cells(cells)  # every other drafter is evaluated and logged; then the run is not green
        tracking.end_run(parent)
        return rows
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise


def _layer_baselines(cfg: PipelineConfig, cells: list[dict], dense: str, base_model: str, data: str,
                     common: dict) -> list[DrafterSpec]:
    """Layer-pruned drafters with the MACs of the chosen sparse cells, each given the budget its counterpart had."""
    out = []
    for ref_cell in _layer_match_cells(cells, cfg):
        if cfg.layer_baseline_from == "dense":  # same budget as a sparse cell: dense training + short FT
            lp = layer_match_task(dense, ref_cell["pruned"], data, cfg.layer_match_settings())
            steps = cfg.sparse_ft_steps
        else:
            lp = layer_match_task(base_model, ref_cell["pruned"], data, cfg.layer_match_settings())
            steps = cfg.train_steps
        # over the target's cache like the sparse cells when its layers map onto the target's (a slice of a copy)
        kv = cfg.shared_kv and bool(steps) and slice_can_read(cfg.target, lp)
        lp_ft = train_drafter(lp, data, cfg.train_settings(steps, shared_kv=kv)) if steps else lp
        out.append(DrafterSpec(name=f"layer-pruned-{ref_cell['sparsity']:g}", path=lp_ft, params={
            **common, "kind": "layer-pruned", "matched_to": _cell_name(ref_cell), "train.shared_kv": kv,
            "matched_sparsity": ref_cell["sparsity"], "layer_baseline.from": cfg.layer_baseline_from,
            "layer_baseline.ft_steps": steps}))
    return out


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(settings: EvalSettings = EvalSettings(), alias: str = "champion") -> list[dict]:
    """Re-measure the registered champion drafter (fresh timings, not cached) and log it as a new run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    name = tracking.registered_model_name(settings.target)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"no registered model {name}@{alias} yet: run the pipeline first ({exc})") from None
    path = mv.tags.get("sd2.model_dir", "")
    if not Path(path).is_dir():  # another machine: fetch the registry's copy
        path = mlflow.artifacts.download_artifacts(artifact_uri=mv.source)
    drafter = DrafterSpec(name=f"{alias}-v{mv.version}", path=path, params={"kind": "nightly", "version": mv.version})
    parent = tracking.start_parent(settings.target, "nightly-eval", tags=_prefect_tags())
    try:
        rows = evaluate_drafters([drafter], settings, parent_run_id=parent, register_champion=False, fresh=True)
    finally:
        tracking.end_run(parent)
    return rows
