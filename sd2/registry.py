"""The model registry: the champion drafter of a target (alias `champion` = best theoretical speedup) and
`sd2 export` of any drafter run or registered version as a self-contained HF dir."""

from __future__ import annotations

from pathlib import Path

from sd2.errors import UserError
from sd2.io import publish_dir
from sd2.journal import journaled
from sd2.tracking import _client, registered_model_name, tracking_uri


def _register_champion(target: str, run_ids: list[str]) -> dict | None:
    """Register the drafter with the best theoretical speedup and point alias `champion` at it."""
    _, client = _client()
    runs = [client.get_run(r) for r in run_ids]
    runs = [r for r in runs if "theoretical_speedup" in r.data.metrics and r.data.tags.get("sd2.model_dir")]
    if not runs:
        return None
    best = max(runs, key=lambda r: r.data.metrics["theoretical_speedup"])
    name = registered_model_name(target)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - mlflow raises RestException/MlflowException by backend
        client.create_registered_model(name, description=f"sd2 drafters for {target}; alias champion = best "
                                                         "theoretical speedup")
    model_dir = best.data.tags["sd2.model_dir"]
    existing = [v for v in client.search_model_versions(f"name='{name}'")
                if v.run_id == best.info.run_id or v.tags.get("sd2.model_dir") == model_dir]
    if existing:  # the same drafter won again (e.g. a cached re-run): keep its version
        mv = existing[0]
        client.set_registered_model_alias(name, "champion", mv.version)
        return {"name": name, "version": mv.version, "run_id": best.info.run_id,
                "drafter": best.data.tags.get("sd2.drafter")}
    # The registry keeps its own copy: the model files become artifacts of the champion's run.
    client.log_artifacts(best.info.run_id, model_dir, artifact_path="model")
    mv = client.create_model_version(name, source=f"{best.info.artifact_uri.rstrip('/')}/model",
                                     run_id=best.info.run_id,
                                     tags={"theoretical_speedup": str(best.data.metrics["theoretical_speedup"]),
                                           "mal": str(best.data.metrics.get("mal")), "sd2.model_dir": model_dir})
    client.set_registered_model_alias(name, "champion", mv.version)
    return {"name": name, "version": mv.version, "run_id": best.info.run_id,
            "drafter": best.data.tags.get("sd2.drafter")}


def register_champion(target: str, run_ids: list[str]) -> dict | None:
    return journaled("register_champion", _register_champion, target=target, run_ids=run_ids)


JOURNALED_OPS = {"register_champion": _register_champion}


def export_drafter(ref: str, out: str | Path, overwrite: bool = False) -> Path:
    """`sd2 export`: a self-contained HF drafter dir from an MLflow run id or `models:/NAME@ALIAS` (or /VERSION),
    with a README holding its metrics and lineage."""
    import shutil

    from sd2.models import check_output_dir

    out = Path(out)
    check_output_dir(out, overwrite)
    mlflow, client = _client()
    if ref.startswith("models:/"):
        name, _, sel = ref[len("models:/"):].partition("@")
        try:
            mv = client.get_model_version_by_alias(name, sel) if sel else client.get_model_version(
                *ref[len("models:/"):].split("/", 1))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--run {ref}: no such registered model version ({str(exc).splitlines()[0]})") from None
        run_id, source, local = mv.run_id, mv.source, mv.tags.get("sd2.model_dir")
    else:
        try:
            run = client.get_run(ref)
        except Exception:  # noqa: BLE001
            raise UserError(f"--run {ref}: no such MLflow run in {tracking_uri()}") from None
        run_id, source, local = ref, None, run.data.tags.get("sd2.model_dir")
    run = client.get_run(run_id)
    if not (local and Path(local).is_dir()) and not source:
        raise UserError(f"--run {ref}: the run's model dir {local!r} is not on this machine and it is not registered")
    with publish_dir(out) as tmp:
        src = local if local and Path(local).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=source)
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "README.md").write_text(_model_card(run, run_id))
    return out


def _model_card(run, run_id: str) -> str:
    """README of an exported drafter: its metrics and lineage, read from its MLflow run."""
    m = run.data.metrics
    lines = [f"# sd2 drafter `{run.data.tags.get('sd2.drafter', run_id)}`", "",
             f"Speculative-decoding drafter exported by sd2 from MLflow run `{run_id}` ({tracking_uri()}).", "",
             "| metric | value |", "|---|---|"]
    for k in ("mal", "mal_ci95_lo", "mal_ci95_hi", "acceptance_rate", "drafter_macs_per_token", "cost_ratio",
              "theoretical_speedup", "speedup"):
        if k in m:
            lines.append(f"| {k} | {m[k]:.4g} |")
    lines += ["", "## Lineage", ""] + [f"- `{k}`: {v}" for k, v in sorted(run.data.params.items())]
    lines += ["", "## Use it", "", "See docs/deploy.md of sd2: HF `generate(assistant_model=...)`, vLLM "
              "`speculative_config={\"method\": \"draft_model\", ...}`, SGLang `--speculative-draft-model-path`."]
    return "\n".join(lines) + "\n"
