"""MLflow conventions (docs/architecture.md): experiment `sd2/<target>`, a parent run per pipeline/sweep, a child run
per drafter (params, metrics incl. per category and per position, train loss by step, artifacts), the
distilled dataset as an input, and the registered model `sd2-drafter-<target>` whose alias `champion` is
the drafter with the best theoretical speedup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from sd2.errors import UserError
from sd2.journal import PENDING_PREFIX, journaled  # noqa: F401 - PENDING_PREFIX is part of this API

RUNS_DIR = Path(os.environ.get("SD2_RUNS_DIR", "sd2-runs"))


def runs_dir() -> Path:
    """The folder that holds a local record of everything: MLflow's database and its artifacts, the journal."""
    return Path(os.environ.get("SD2_RUNS_DIR", RUNS_DIR)).resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file under ./sd2-runs/ (MLflow's default backend since 3.7)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    runs = runs_dir()
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def local_artifact_root() -> Path | None:
    """Where a local (sqlite/file) store keeps artifacts: beside its database, so `sd2-runs/` is the whole
    record (MLflow's own default is `./mlruns` in whatever folder the experiment was first created). None for a
    tracking server, which has its own artifact store."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "artifacts"
    return None


def set_experiment(mlflow, target: str):
    """Get or create the target's experiment; a new local one gets its artifacts under sd2-runs/artifacts.
    An existing experiment keeps its location (older ones with artifacts in ./mlruns keep working)."""
    name = experiment_name(target)
    exp = mlflow.get_experiment_by_name(name)
    root = local_artifact_root()
    if exp is None and root is not None:
        try:
            mlflow.create_experiment(name, artifact_location=(root / name.replace("/", "-")).as_uri())
        except Exception:  # noqa: BLE001 - created meanwhile by another process: use theirs
            pass
    return mlflow.set_experiment(name)


def target_slug(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(target)).name if "/" in str(target) else str(target)).strip("-")


def experiment_name(target: str) -> str:
    return f"sd2/{target_slug(target)}"


def registered_model_name(target: str) -> str:
    return f"sd2-drafter-{target_slug(target)}"


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def client():
    """(mlflow module, MlflowClient) pointed at the tracking store, with fast fail-over to the journal."""
    return _client()


def _client():
    import mlflow

    # Fail over to the local journal in seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow, mlflow.MlflowClient(uri)


def check_reachable() -> None:
    """One clear line when a configured tracking server cannot be reached."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
    except OSError as exc:
        raise UserError(f"MLFLOW_TRACKING_URI {uri}: unreachable ({exc}); start it (`sd2 ui`) or unset it "
                        "to use the local SQLite store") from None


def _start_parent(target: str, name: str, tags: dict | None = None, params: dict | None = None) -> str:
    """Create the parent run of a pipeline or sweep; returns its run id (the run is left open for children)."""
    mlflow, client = _client()
    exp = set_experiment(mlflow, target)
    all_tags = {"sd2.kind": "pipeline", "git_sha": git_sha() or "unknown", **(tags or {})}
    run = client.create_run(exp.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    for k, v in _flat(params or {}).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def _end_run(run_id: str, status: str = "FINISHED") -> None:
    _, client = _client()
    client.set_terminated(run_id, status)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = "" if v is None else str(v)[:500]
    return out


def eval_metrics(res: dict) -> dict[str, float]:
    """MLflow metric names of one eval result (the eval JSON keys, flattened)."""
    m = {k: res[k] for k in ("mal", "acceptance_rate", "drafter_macs_per_token", "cost_ratio", "theoretical_speedup",
                             "speedup", "target_tokens_per_s", "spec_tokens_per_s", "verify_cost_ratio",
                             "drafter_time_ratio", "predicted_speedup", "mean_drafted", "lookup_step_share",
                             "prompt_vocab_rows", "drafter_weight_bytes_per_token", "drafter_nonzero_bytes_per_token",
                             "target_weight_bytes_per_token", "weight_bytes_ratio")
         if res.get(k) is not None}
    m["mal_ci95_lo"], m["mal_ci95_hi"] = res["mal_ci95"]
    m["lossless"] = float(bool(res["lossless"])) if res.get("lossless") is not None else None
    for i, a in enumerate(res["per_position_acceptance"]):
        m[f"acceptance.pos{i + 1}"] = a
    for cat, v in res["per_category"].items():
        m[f"mal.{cat}"] = v["mal"]
        m[f"speedup.{cat}"] = v["speedup"]
    replay = res.get("replay") or {}
    settings = {f"g{g}": v for g, v in replay.get("gammas", {}).items()} | (res.get("extra") or {})
    for label, v in settings.items():  # more γ (replayed or run) and the sampling run: <metric>.<g4|t1>
        for k in ("mal", "acceptance_rate", "theoretical_speedup", "speedup"):
            if v.get(k) is not None:
                m[f"{k}.{label}"] = v[k]
        m[f"mal_ci95_lo.{label}"], m[f"mal_ci95_hi.{label}"] = v["mal_ci95"]
    if "engine_check" in replay:
        m["replay_check.mal_engine"] = replay["engine_check"]["mal_engine"]
        m["replay_check.mal_replay"] = replay["engine_check"]["mal_replay"]
    return {k: float(v) for k, v in m.items() if v is not None and v == v}


def _log_drafter_run(parent_id: str, target: str, name: str, params: dict, res: dict,
                    records: pd.DataFrame | None = None, model_dir: str | Path | None = None,
                    dataset_dir: str | Path | None = None, extra_tags: dict | None = None) -> str:
    """One child run per drafter: params, metrics, train loss by step, artifacts; returns the run id."""
    mlflow, client = _client()
    exp = set_experiment(mlflow, target)
    tags = {"mlflow.parentRunId": parent_id, "sd2.kind": "drafter", "sd2.drafter": name,
            "git_sha": git_sha() or "unknown", **(extra_tags or {})}
    run = client.create_run(exp.experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
    rid = run.info.run_id
    try:
        for k, v in _flat(params).items():
            client.log_param(rid, k, v)
        for k, v in eval_metrics(res).items():
            client.log_metric(rid, k, v)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "eval.json").write_text(json.dumps(res, indent=2, default=str))
            client.log_artifact(rid, str(tmp / "eval.json"))
            cats = pd.DataFrame([{"category": c, **v} for c, v in res["per_category"].items()])
            cats.to_csv(tmp / "per_category.csv", index=False)
            client.log_artifact(rid, str(tmp / "per_category.csv"))
            if records is not None:
                records.to_csv(tmp / "per_prompt.csv", index=False)
                client.log_artifact(rid, str(tmp / "per_prompt.csv"))
            (tmp / "config.json").write_text(json.dumps(params, indent=2, default=str))
            client.log_artifact(rid, str(tmp / "config.json"))
        if model_dir is not None:
            model_dir = Path(model_dir)
            for meta in ("sparsity.json", "sd2_layers.json", "sd2_train.json"):
                if (model_dir / meta).exists():
                    client.log_artifact(rid, str(model_dir / meta))
            train_log = model_dir / "sd2_train.json"
            if train_log.exists():
                for h in json.loads(train_log.read_text()).get("log_history", []):
                    if "loss" in h:
                        client.log_metric(rid, "train.loss", float(h["loss"]), step=int(h["step"]))
            client.set_tag(rid, "sd2.model_dir", str(model_dir.resolve()))
        if dataset_dir is not None:
            _log_dataset(rid, Path(dataset_dir))
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def _log_dataset(run_id: str, path: Path) -> None:
    import mlflow

    manifest = path / "sd2_manifest.json"
    if not manifest.exists():
        return
    man = json.loads(manifest.read_text())
    df = pd.DataFrame([{"rows": float(man.get("counts", {}).get("kept", 0)), "mode": man.get("mode"),
                        "target": man.get("target")}])
    ds = mlflow.data.from_pandas(df, source=str(path.resolve()), name=f"distilled-{man.get('mode')}",
                                 digest=str(man.get("prompts_digest", ""))[:16] + str(man.get("target_digest", ""))[:8])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(ds, context="training")


def _log_parent_artifacts(parent_id: str, files: list[str | Path], metrics: dict | None = None) -> None:
    _, client = _client()
    for f in files:
        client.log_artifact(parent_id, str(f))
    for k, v in (metrics or {}).items():
        client.log_metric(parent_id, k, float(v))


COMPARE_COLUMNS = ["drafter", "mal", "mal_ci95_lo", "mal_ci95_hi", "acceptance_rate", "drafter_macs_per_token",
                   "cost_ratio", "weight_bytes_ratio", "theoretical_speedup", "drafter_time_ratio", "verify_cost_ratio",
                   "predicted_speedup", "speedup", "lossless"]


def compare(experiment: str | None = None, parent_run_id: str | None = None) -> pd.DataFrame:
    """Drafter runs of an experiment (optionally one pipeline run) as a DataFrame, best theoretical speedup first."""
    mlflow, _ = _client()
    names = [experiment] if experiment else [e.name for e in mlflow.search_experiments() if e.name.startswith("sd2/")]
    if not names:
        raise UserError("no sd2 experiments in the tracking store; run `sd2 demo` or a pipeline first")
    flt = "tags.`sd2.kind` = 'drafter'"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    df = mlflow.search_runs(experiment_names=names, filter_string=flt, order_by=["attributes.start_time DESC"])
    if df.empty:
        return pd.DataFrame(columns=["experiment", "run_id", *COMPARE_COLUMNS])
    out = pd.DataFrame({"run_id": df["run_id"], "drafter": df.get("tags.sd2.drafter"),
                        "parent": df.get("tags.mlflow.parentRunId")})
    for c in COMPARE_COLUMNS[1:]:
        col = f"metrics.{c}"
        out[c] = df[col] if col in df else None
    for c in ("params.prune.method", "params.prune.pattern", "params.prune.sparsity", "params.kind"):
        if c in df:
            out[c.split("params.")[1]] = df[c]
    return out.sort_values("theoretical_speedup", ascending=False, na_position="last").reset_index(drop=True)


def start_parent(target: str, name: str, tags: dict | None = None, params: dict | None = None) -> str:
    return journaled("start_parent", _start_parent, target=target, name=name, tags=tags, params=params)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    return journaled("end_run", _end_run, run_id=run_id, status=status)


def log_drafter_run(parent_id: str, target: str, name: str, params: dict, res: dict,
                    records: pd.DataFrame | None = None, model_dir=None, dataset_dir=None,
                    extra_tags: dict | None = None) -> str:
    return journaled(
        "log_drafter_run", _log_drafter_run, parent_id=parent_id, target=target, name=name, params=params, res=res,
        records=records,
        model_dir=str(model_dir) if model_dir else None, dataset_dir=str(dataset_dir) if dataset_dir else None,
        extra_tags=extra_tags)


def log_parent_artifacts(parent_id: str, files: list, metrics: dict | None = None) -> None:
    return journaled(
        "log_parent_artifacts", _log_parent_artifacts, parent_id=parent_id, files=[str(f) for f in files],
        metrics=metrics)






JOURNALED_OPS = {"start_parent": _start_parent, "end_run": _end_run, "log_drafter_run": _log_drafter_run,
                 "log_parent_artifacts": _log_parent_artifacts}


def sync() -> int:
    """Send the calls journaled while the tracking server was unreachable (see sd2.journal)."""
    from sd2.journal import sync as _sync

    return _sync()


def __getattr__(name: str):
    """Names that moved: the registry (champion, export) and the offline journal have their own modules."""
    if name in ("register_champion", "export_drafter"):
        from sd2 import registry

        return getattr(registry, name)
    raise AttributeError(name)
