"""Flows under prefect_test_harness on tiny models: results, MLflow runs, champion alias, and cache hits."""

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    # The pipelines run in their own folder with the default ./sd2-runs (no SD2_RUNS_DIR): what they leave in
    # the folder is checked.
    (root / "cwd").mkdir()
    env = {"SD2_HOME": str(root / "home"), "PREFECT_HOME": str(root / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "home" / "prefect-results")}
    old = {k: os.environ.get(k) for k in [*env, "MLFLOW_TRACKING_URI", "SD2_RUNS_DIR"]}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SD2_RUNS_DIR", None)
    cwd = os.getcwd()
    os.chdir(root / "cwd")
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield root
    finally:
        os.chdir(cwd)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_target(harness, tok300):
    from sd2.models import save_model
    from tests.conftest import make_llama

    d = harness / "target"
    save_model(make_llama(len(tok300), layers=4, seed=1, eos=tok300.eos_token_id, hidden=64), tok300, d)
    return d


@pytest.fixture(scope="module")
def eval_file(harness):
    f = harness / "eval.jsonl"
    f.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"the lazy dog {i}"]}) + "\n"
                         for i, c in enumerate(["a", "b", "a", "b"])))
    return f


def _config(tiny_target, seed_file, eval_file, **kw):
    from sd2.config import PipelineConfig, SweepGrid

    kw = {"drafter_layers": "0,-1", "sweep": SweepGrid(methods=["sparsegpt", "wanda"],
                                                       patterns=["unstructured", "2:4"], sparsities=[0.5]), **kw}
    return PipelineConfig(profile="tiny", target=str(tiny_target), seed_prompts=str(seed_file),
                          eval_prompts=str(eval_file), **kw)


def _newest_run(tiny_target, name: str):
    """The newest MLflow run of that name in the tiny target's experiment (a row of mlflow.search_runs)."""
    import mlflow

    from sd2 import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return mlflow.search_runs(experiment_names=[tracking.experiment_name(str(tiny_target))],
                              filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1).iloc[0]


def _task_states(since):
    """{task function name: [state names]} of the task runs created after `since`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        out = {}
        runs = [tr for off in range(0, 1000, 200) for tr in client.read_task_runs(limit=200, offset=off)]
        for tr in runs:
            if tr.created and tr.created >= since:
                out.setdefault(tr.task_key.rsplit("-", 1)[0], []).append(tr.state.name)
        return out


def _log_messages() -> list[str]:
    """Every log line the Prefect API holds (the runs' printed and logged output)."""
    from prefect.client.orchestration import get_client

    out: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(out)):
            out += [rec.message for rec in page]
    return out


def test_pipeline_runs_logs_and_caches(harness, tiny_target, seed_file, eval_file):
    import mlflow

    from flows.pipeline import sd2_pipeline
    from sd2 import tracking

    cfg = _config(tiny_target, seed_file, eval_file)
    state = sd2_pipeline(cfg, return_state=True)
    rows = state.result()
    names = [r["drafter"] for r in rows]
    assert names == ["derived-untuned", "dense-self-distilled", "sparsegpt-unstructured-0.5", "sparsegpt-2of4-0.5",
                     "wanda-unstructured-0.5", "wanda-2of4-0.5", "layer-pruned-0.5"]
    assert all(r["lossless"] for r in rows)
    logs = _log_messages()  # printed training logs reach the run's log; nothing a library disassembled does
    assert any("'loss'" in m for m in logs) and not any("LOAD_GLOBAL" in m or "RESUME" in m for m in logs)
    # each long stage's progress reaches the run's log too (the UI shows where a stage is), ending at 100%
    for stage in ("distill (regenerate): ", "train (", "prune sparsegpt: ", "eval (timed): "):
        assert any(m.startswith(stage) and "(100%)" in m for m in logs), (stage, [m for m in logs if "%" in m])

    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = harness / "cwd" / "sd2-runs"
    assert tracking.tracking_uri() == f"sqlite:///{runs / 'mlflow.db'}"
    # the whole record lives in ./sd2-runs: the database and every artifact (no ./mlruns beside it)
    assert sorted(os.listdir(harness / "cwd")) == ["sd2-runs"]
    exp = mlflow.get_experiment_by_name(tracking.experiment_name(str(tiny_target)))
    assert exp.artifact_location.startswith((runs / "artifacts").as_uri())
    df = tracking.compare(tracking.experiment_name(str(tiny_target)))
    assert len(df) == 7 and df["mal"].notna().all()
    client = mlflow.MlflowClient()
    child = client.get_run(df.loc[df["drafter"] == "sparsegpt-unstructured-0.5", "run_id"].iloc[0])
    assert child.data.params["prune.method"] == "sparsegpt" and child.data.params["prune.sparsity"] == "0.5"
    assert {"mal", "acceptance.pos1", "mal.a", "cost_ratio", "theoretical_speedup"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "train.loss")) >= 1
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"per_category.csv", "sparsity.json", "config.json", "eval.json"} <= arts
    assert child.inputs.dataset_inputs  # the distilled dataset as an MLflow input
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert "mal_vs_macs.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert any((runs / "artifacts").rglob("per_category.csv"))
    champ = client.get_model_version_by_alias(tracking.registered_model_name(str(tiny_target)), "champion")
    best = df.iloc[0]
    assert champ.run_id == best["run_id"]

    # second run: every expensive task is served from the cache
    import datetime

    since = datetime.datetime.now(datetime.timezone.utc)
    state2 = sd2_pipeline(cfg, return_state=True)
    assert [r["drafter"] for r in state2.result()] == names
    states = _task_states(since)
    for key in ("distill_task", "train_task", "prune_task", "eval_task", "derive_task"):
        assert states.get(key) and set(states[key]) == {"Cached"}, (key, states)

    # the nightly re-evaluation measures the registered champion afresh (not from the cache)
    from flows.pipeline import EvalSettings, nightly_eval

    since = datetime.datetime.now(datetime.timezone.utc)
    rows = nightly_eval(EvalSettings(target=str(tiny_target), prompts=str(eval_file), limit=2, max_new_tokens=6))
    assert len(rows) == 1 and rows[0]["drafter"] == f"champion-v{champ.version}"
    assert _task_states(since).get("eval_task") == ["Completed"]
    runs = mlflow.search_runs(experiment_names=[tracking.experiment_name(str(tiny_target))],
                              filter_string="attributes.run_name = 'nightly-eval'")
    assert len(runs) == 1


def test_study_options_baselines_gammas_and_sampling(harness, tiny_target, seed_file, eval_file):
    """What the reproduction study uses: plain-SFT baseline, layer-pruned drafters matched to two cells, more γ by
    replay (checked against the engine), and a sampling run for one drafter, all on each drafter's MLflow run."""
    import mlflow

    from flows.pipeline import sd2_pipeline
    from sd2 import tracking
    from sd2.config import SweepGrid

    cfg = _config(tiny_target, seed_file, eval_file, name="study", sft_baseline=True, layer_match=[0.5, 0.7],
                  eval_gammas=[2, 6], replay_limit=4, sampling_temperature=1.0,
                  sampling_drafters=["dense-self-distilled"], register_champion=False)
    cfg = cfg.model_copy(update={"sweep": SweepGrid(methods=["sparsegpt"], sparsities=[0.5, 0.7])})
    rows = sd2_pipeline(cfg)
    names = [r["drafter"] for r in rows]
    assert names == ["derived-untuned", "dense-self-distilled", "dense-plain-sft", "sparsegpt-unstructured-0.5",
                     "sparsegpt-unstructured-0.7", "layer-pruned-0.5", "layer-pruned-0.7"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[tracking.experiment_name(str(tiny_target))],
                              filter_string="tags.`sd2.kind` = 'drafter'", max_results=50)
    runs = runs[runs["tags.mlflow.parentRunId"] == runs.loc[runs["tags.sd2.drafter"] == "dense-plain-sft",
                                                            "tags.mlflow.parentRunId"].iloc[0]]
    assert len(runs) == 7
    for _, r in runs.iterrows():
        for g in (2, 4, 6):
            assert 1.0 <= r[f"metrics.mal.g{g}"] <= g + 1
        # the replayed γ=4 equals the engine's γ=4 on the prompts both decoded
        assert r["metrics.replay_check.mal_replay"] == pytest.approx(r["metrics.replay_check.mal_engine"])
    dense = runs[runs["tags.sd2.drafter"] == "dense-self-distilled"].iloc[0]
    assert dense["metrics.mal.t1"] >= 1.0 and dense["metrics.acceptance_rate.t1"] >= 0.0
    assert runs[runs["tags.sd2.drafter"] != "dense-self-distilled"]["metrics.mal.t1"].isna().all()
    lp = runs[runs["tags.sd2.drafter"] == "layer-pruned-0.7"].iloc[0]
    assert lp["params.matched_to"] == "sparsegpt-unstructured-0.7" and lp["params.layer_baseline.from"] == "dense"
    sft = runs[runs["tags.sd2.drafter"] == "dense-plain-sft"].iloc[0]
    assert sft["params.distill.mode"] == "reference"

    # docs/results.md from those runs: claims checked, tables, plots; the numbers are the runs' numbers
    import yaml

    from sd2.report import write_results

    cfg_file = harness / "study.yaml"
    cfg_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    reading = harness / "reading.md"
    reading.write_text("## Reading\n\nhand-written words\n")
    files = write_results([str(cfg_file)], str(harness / "docs" / "results.md"), str(reading), command="sd2 report")
    text = files[0].read_text()
    assert f"sd2 pipeline --config {cfg_file}" in text and text.rstrip().endswith("hand-written words")
    parent = mlflow.get_run(sft["tags.mlflow.parentRunId"]).data.metrics  # what distillation kept, on the parent
    assert parent["distill.kept"] >= 1 and parent["distill.seed_records"] >= parent["distill.kept"]
    assert f" — {parent['distill.kept']:.0f} of {parent['distill.seed_records']:.0f} answers kept (" in text
    assert "fine-grained sparsity beats layer pruning at equal MACs (sparsegpt-unstructured-0.7 vs " \
           "layer-pruned-0.7)" in text
    assert f"{dense['metrics.mal.g4']:.3f}" in text and f"{dense['metrics.mal.t1']:.3f}" in text
    assert "| bytes ratio | time ratio | predicted speedup | measured speedup |" in text  # what the CPU feels
    assert f"| {dense['metrics.weight_bytes_ratio']:.3f} | {dense['metrics.drafter_time_ratio']:.3f} |" in text
    pngs = {f.name for f in files[1:]}
    assert {"results-study-mal_vs_sparsity.png", "results-study-mal_vs_macs.png",
            "results-study-mal_vs_gamma.png"} <= pngs and all((harness / "docs" / n).stat().st_size for n in pngs)
    assert all(f"![{Path(n).stem}]({n})" in text for n in pngs)


def test_engine_gammas_in_the_report(harness, tiny_target, seed_file, eval_file):
    """More γ as full engine runs (how cross-tokenizer studies measure them): per-γ MAL and measured speedup on
    the drafter's run, and every γ (the main one included) in the report's γ table and plot."""
    import mlflow
    import yaml

    from flows.pipeline import sd2_pipeline
    from sd2 import tracking
    from sd2.config import SweepGrid
    from sd2.report import write_results

    cfg = _config(tiny_target, seed_file, eval_file, name="engine-gammas", eval_gammas=[2], eval_gamma_mode="engine",
                  register_champion=False, layer_baseline=False)
    cfg = cfg.model_copy(update={"sweep": SweepGrid(methods=["magnitude"], sparsities=[0.5])})
    sd2_pipeline(cfg)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[tracking.experiment_name(str(tiny_target))],
                              filter_string="attributes.run_name = 'dense-self-distilled'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    r = runs.iloc[0]
    assert r["metrics.speedup.g2"] > 0 and 1.0 <= r["metrics.mal.g2"] <= 3.0 and "metrics.mal.g4" not in runs
    f = harness / "engine.yaml"
    f.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    files = write_results([str(f)], str(harness / "docs2" / "results.md"))
    text = files[0].read_text()
    assert "| drafter | MAL γ=2 | theor. γ=2 | measured γ=2 | MAL γ=4 | theor. γ=4 | measured γ=4 |" in text
    assert "| MAL γ=4 (engine) |" in text and "MAL engine" not in text  # no replay: one MAL column, not two
    assert f"{r['metrics.speedup.g2']:.3f}" in text and f"{r['metrics.speedup']:.3f}" in text
    assert any(x.name.endswith("mal_vs_gamma.png") for x in files)


def test_drafter_recipe_without_sweep_kd_from_stored_logits_and_draft_vocab(harness, tiny_target, seed_file,
                                                                             eval_file):
    """The layer-slice recipe shape (configs/drafter-smollm2-layers.yaml): a seed mix, stored teacher logits, KD, a
    compact draft head, packing, no prune sweep and no untuned baseline; its options are on the drafter's MLflow
    run."""

    from flows.pipeline import sd2_pipeline

    cfg = _config(tiny_target, f"{seed_file}:6+{seed_file}:3", eval_file,
                  name="recipe", distill_store_topk=8, train_loss="kd", draft_vocab=64, packing=True, prune=False,
                  untuned_baseline=False, register_champion=False)
    rows = sd2_pipeline(cfg)
    assert [r["drafter"] for r in rows] == ["dense-self-distilled"] and rows[0]["lossless"]
    run = _newest_run(tiny_target, "dense-self-distilled")
    assert run["params.draft_vocab"] == "64" and run["params.train.loss"] == "kd"
    assert run["params.distill.store_topk"] == "8"
    model_dir = Path(run["tags.sd2.model_dir"])
    assert json.loads((model_dir / "sd2_train.json").read_text())["kd_teacher"] == "stored"
    assert len(json.loads((model_dir / "draft_vocab.json").read_text())["draft_ids"]) == 64


def test_sparse_recipe_prunes_the_target_depth_drafter_without_dense_training(harness, tiny_target, seed_file,
                                                                              eval_file):
    """configs/drafter-smollm2.yaml's shape: train_steps 0 and drafter_layers '0--1' → the sweep prunes a
    copy of the whole target, and sparse fine-tuning (KD from stored logits) gives it the compact head; the
    layer-pruned baseline is cut from the same copy with matched MACs. No dense drafter is evaluated (untrained,
    it would be the target itself). The sparse cell is fine-tuned (in bf16) to draft over the target's KV cache
    and evaluated so; so is the layer-pruned baseline, a slice of that copy (each kept layer reads the target
    layer it was cut from: the comparison at equal MACs is made with both drafters over the target's cache)."""

    from flows.pipeline import sd2_pipeline
    from sd2.config import PipelineConfig, SweepGrid
    from sd2.metrics import linear_nonzeros
    from sd2.models import load_model

    cfg = _config(tiny_target, seed_file, eval_file, name="sparse-recipe", drafter_layers="0--1", train_steps=0,
                  sweep=SweepGrid(methods=["sparsegpt"], patterns=["unstructured"], sparsities=[0.7],
                                  allocation="owl", owl_lambda=0.05),
                  distill_store_topk=8, train_loss="kd", draft_vocab=64, packing=True, untuned_baseline=False,
                  register_champion=False, layer_kd=1.0, shared_kv=True, shared_kv_rounds=2,
                  train_dtype="bfloat16", prompt_vocab=True, replay_limit=3)
    rows = sd2_pipeline(cfg)
    assert [r["drafter"] for r in rows] == ["sparsegpt-unstructured-0.7-owl", "layer-pruned-0.7"]
    assert all(r["lossless"] for r in rows)
    assert [r["shared_kv"] for r in rows] == [True, True]
    run = _newest_run(tiny_target, "sparsegpt-unstructured-0.7-owl")
    assert run["params.train.steps"] == "0" and run["params.prune.allocation"] == "owl"
    assert run["params.train.shared_kv"] == "True" and run["params.train.shared_kv_rounds"] == "2"
    assert run["params.eval.prompt_vocab"] == "True" and float(run["metrics.prompt_vocab_rows"]) > 0
    assert 1.0 <= run["metrics.mal.g4"] <= 5.0  # replay_limit alone: the headline γ replayed over those prompts
    sliced = _newest_run(tiny_target, "layer-pruned-0.7")
    assert sliced["params.train.shared_kv"] == "True"
    assert json.loads((Path(sliced["tags.sd2.model_dir"]) / "config.json").read_text())["sd2_shared_kv"]
    assert run["params.sparse_ft.layer_kd"] == "1.0"
    sparse = Path(run["tags.sd2.model_dir"])
    assert len(json.loads((sparse / "draft_vocab.json").read_text())["draft_ids"]) == 64
    record = json.loads((sparse / "sd2_train.json").read_text())
    assert record["kd_teacher"] == "stored" and record["config"]["layer_kd"] == 1.0
    assert record["config"]["shared_kv"] and record["config"]["dtype"] == "bfloat16"
    carried = json.loads((sparse / "sparsity.json").read_text())  # the pruning record travels with the cell
    assert carried["allocation"] == "owl" and len(set(carried["layer_sparsity"])) > 1
    model, _ = load_model(str(sparse), with_tokenizer=False)
    target, _ = load_model(str(tiny_target), with_tokenizer=False)
    assert model.config.num_hidden_layers == target.config.num_hidden_layers
    body = {k: v for k, v in linear_nonzeros(model).items() if "_proj" in k}
    # the masks survived fine-tuning: 70% zero overall, each layer within owl's ± 0.05
    assert body and sum(n for n, _ in body.values()) <= 0.31 * sum(t for _, t in body.values())
    assert all(nnz <= 0.36 * total for nnz, total in body.values())
    with pytest.raises(ValueError, match="train_steps: 0 skips dense training"):
        PipelineConfig(train_steps=0, prune=False)
    with pytest.raises(ValueError, match="train_steps: 0 leaves the plain-SFT baseline"):
        PipelineConfig(train_steps=0, sft_baseline=True)
    with pytest.raises(ValueError, match="layer_kd: the per-layer loss"):
        PipelineConfig(layer_kd=1.0, prune=False)


def test_feature_drafter_recipe_with_seed_answers(harness, tiny_target, seed_file, eval_file):
    """The feature-drafter recipe shape: distill, seed answers as extra text, an EAGLE-style drafter built from the
    target (multi-layer reads, unrolled loss, compact head), evaluated through the engine and replay; its options
    are on its MLflow run. A prune sweep over a feature drafter is refused by the form."""

    from flows.pipeline import sd2_pipeline
    from sd2.config import PipelineConfig

    cfg = _config(tiny_target, seed_file, eval_file, name="feature-recipe", train_loss="kd", draft_vocab=64,
                  packing=True, prune=False, feature_drafter=True, feature_reads=[0, -1], feature_unroll=True,
                  reference_seeds=f"{seed_file}:5", register_champion=False, eval_gammas=[2])
    rows = sd2_pipeline(cfg)
    assert [r["drafter"] for r in rows] == ["feature-self-distilled"] and rows[0]["lossless"]
    run = _newest_run(tiny_target, "feature-self-distilled")
    assert run["params.train.feature_drafter"] == "True" and run["params.train.feature_reads"] == "[0, -1]"
    assert run["params.train.reference_seeds"] == f"{seed_file}:5"
    info = json.loads((Path(run["tags.sd2.model_dir"]) / "sd2_train.json").read_text())
    assert info["feature_drafter"] and info["data"]["rows"] > 5  # distilled rows + the 5 seed answers
    with pytest.raises(ValueError, match="feature_drafter: the prune sweep needs"):
        PipelineConfig(feature_drafter=True)
    with pytest.raises(ValueError, match="magpie_openers: tasks starts self-written seeds"):
        PipelineConfig(magpie_openers="tasks", seed_prompts=str(seed_file))
    steered = PipelineConfig(magpie_openers="tasks", seed_prompts=f"{seed_file}:4+magpie:2").resolved()
    assert steered.distill_settings().magpie_openers == "tasks"
    assert steered.distill_settings("reference").magpie_openers == "none"


def test_a_cached_stage_whose_output_was_deleted_is_rebuilt(harness, tiny_target, seed_file):
    """Prefect's record of a stage outlives its output dir (deleted by hand, disk cleaned): the next run must
    rebuild the dir, not hand a dangling path to the next stage; afterwards the record is served again."""
    import datetime
    import shutil

    from flows.pipeline import self_distill
    from sd2.config import DistillSettings

    args = (str(tiny_target), str(seed_file), DistillSettings(limit=4, max_new_tokens=6, batch_size=2, threads=1))
    first = self_distill(*args)
    shutil.rmtree(first)
    since = datetime.datetime.now(datetime.timezone.utc)
    again = self_distill(*args)
    assert again == first and (Path(again) / "sd2_manifest.json").exists()
    assert _task_states(since).get("distill_task") == ["Completed"]
    since = datetime.datetime.now(datetime.timezone.utc)
    assert self_distill(*args) == first
    assert _task_states(since).get("distill_task") == ["Cached"]


def test_sweep_with_an_impossible_cell_runs_the_others_and_is_not_green(harness, tiny_target, seed_file, eval_file):
    """3:7 passes the form (0 < N < M) but 7 does not divide the tiny model's width: only the cell can know. The
    other cell is pruned, fine-tuned, evaluated and logged; the flow run ends Failed naming the cell."""
    import mlflow

    from flows.pipeline import CellsFailed, prune_sweep
    from sd2 import tracking
    from sd2.config import DistillConfig, EvalSettings, SweepConfig, SweepGrid
    from sd2.distill import distill

    data = distill(DistillConfig(target=str(tiny_target), prompts=str(seed_file), out=harness / "sweepdata",
                                 max_new_tokens=8, limit=8), progress=False)
    state = prune_sweep(SweepConfig(target=str(tiny_target), drafter=str(tiny_target), data=str(data),
                                    sweep=SweepGrid(methods=["magnitude"], patterns=["unstructured", "3:7"],
                                                    sparsities=[0.4]),
                                    calib_samples=4, seq_len=32, sparse_ft_steps=1, train_batch_size=2,
                                    eval=EvalSettings(target=str(tiny_target), prompts=str(eval_file), limit=2,
                                                      max_new_tokens=6)), return_state=True)
    assert state.is_failed()
    with pytest.raises(CellsFailed, match=r"magnitude-3of7-0.5714: .*does not divide") as info:
        state.result()
    assert [c["pattern"] for c in info.value.failed] == ["3:7"]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    df = tracking.compare(tracking.experiment_name(str(tiny_target)))
    assert "magnitude-unstructured-0.4" in set(df["drafter"])  # the good cell was evaluated and logged
    parent = mlflow.MlflowClient().get_run(df.loc[df["drafter"] == "magnitude-unstructured-0.4", "parent"].iloc[0])
    assert parent.info.status == "FAILED" and parent.info.run_name == "prune-sweep"


def test_flow_parameters_validated_before_work():
    from pydantic import ValidationError

    from sd2.config import PipelineConfig

    with pytest.raises(ValidationError):
        PipelineConfig(profile="huge")
    with pytest.raises(ValidationError):
        PipelineConfig(gamma=0)
    with pytest.raises(ValidationError):
        PipelineConfig(sweep={"methods": ["obs"]})
