"""Bad input refused before any work: config files (`sd2 pipeline --config`), the Prefect form's JSON schema,
data files and CLI flags → one line naming the field, exit 2, nothing written (no ./sd2-runs, no server)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sd2.cli import app

runner = CliRunner()


def _one_line_exit_2(res, needle: str) -> None:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("sd2: error:"), res.output
    assert needle in lines[0], res.output


CONFIG_CASES = [
    ({"sweep": {"sparsities": [1.5]}}, "sweep.sparsities.0"),
    ({"sweep": {"sparsities": [-0.1]}}, "sweep.sparsities.0"),
    ({"sweep": {"patterns": ["3:2"]}}, "sweep.patterns.0: --pattern 3:2: N:M needs 0 < N < M"),
    ({"sweep": {"patterns": ["2-4"]}}, "sweep.patterns.0: use unstructured or N:M"),
    ({"sweep": {"patterns": ["0:4"]}}, "sweep.patterns.0"),
    ({"sweep": {"methods": ["obs"]}}, "sweep.methods.0"),
    ({"sweep": {"methods": []}}, "sweep.methods"),
    ({"sweep": {"sparsities": "half"}}, "sweep.sparsities"),
    ({"sweep": {"allocation": "owls"}}, "sweep.allocation"),
    ({"sweep": {"owl_lambda": 0.7}}, "sweep.owl-lambda"),
    ({"layer_kd": -1}, "layer-kd"),
    ({"layer_kd": 1.0, "prune": False}, "layer_kd: the per-layer loss"),
    ({"shared_kv": True, "feature_drafter": True, "prune": False}, "shared_kv: a drafter reads the target's KV"),
    ({"gamma": 0}, "gamma"),
    ({"gamma": 100}, "gamma"),
    ({"eval_gammas": [2, 0]}, "eval-gammas.1"),
    ({"layer_match": [1.0]}, "layer-match.0"),
    ({"drafter_layers": "0-8;29"}, "drafter-layers: use a list of layers"),
    ({"train_steps": -4}, "train-steps"),
    ({"trian_steps": 40}, "trian-steps: Extra inputs are not permitted"),
    ({"profile": "huge"}, "profile"),
    ({"device": "gpu"}, "device: use auto, cpu, cuda or cuda:N"),
    ({"dtype": "fp8"}, "dtype"),
    ({"lr": 0}, "lr"),
    ({"eval_gamma_mode": "fast"}, "eval-gamma-mode"),
    ({"sampling_temperature": 0}, "sampling-temperature"),
]


@pytest.mark.parametrize("values, needle", CONFIG_CASES, ids=[n.split(":")[0] for _, n in CONFIG_CASES])
def test_pipeline_config_refused_before_any_work(tmp_path, monkeypatch, values, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # would fail if a server were contacted
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(values))
    res = runner.invoke(app, ["pipeline", "--config", str(cfg)])
    _one_line_exit_2(res, needle)
    assert f"--config {cfg}" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


@pytest.mark.parametrize("text, needle", [
    ("- a\n- b\n", "expected a mapping of PipelineConfig fields"),
    ("sweep: [unclosed\n", "invalid YAML"),
])
def test_config_file_shape(tmp_path, monkeypatch, text, needle):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    _one_line_exit_2(runner.invoke(app, ["pipeline", "--config", str(cfg)]), needle)


def test_missing_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(runner.invoke(app, ["pipeline", "--config", "nope.yaml"]), "file not found")


def test_old_field_names_still_read_with_a_deprecation_line(caplog):
    from sd2.config import EvalSettings, SweepConfig

    s = SweepConfig(drafter="d", data="x", grid={"sparsities": [0.3]}, ft_steps=3, batch_size=2)
    assert s.sweep.sparsities == [0.3] and s.sparse_ft_steps == 3 and s.train_batch_size == 2
    e = EvalSettings(more_gammas=[2, 6], gamma_mode="engine")
    assert e.eval_gammas == [2, 6] and e.eval_gamma_mode == "engine"
    assert "field 'grid' is deprecated; call it 'sweep'" in caplog.text


@pytest.mark.parametrize("args, needle", [
    (["--sparsities", "0.3,abc"], "--sparsities"),
    (["--sparsities", "0.3,1.2"], "sparsities.1"),
    (["--patterns", "5:4"], "patterns.0: --pattern 5:4"),
    (["--methods", "sparsegpt,obs"], "methods.1"),
    (["--gamma", "0"], "gamma"),
    (["--device", "tpu"], "device"),
    (["--allocation", "owls"], "allocation"),
    (["--owl-lambda", "0.5"], "owl-lambda"),
])
def test_sweep_flags_refused_before_any_work(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    res = runner.invoke(app, ["sweep", "--drafter", "d", "--data", "x", *args])
    _one_line_exit_2(res, needle)
    assert list(tmp_path.iterdir()) == []


def _schema_validate(schema: dict, params: dict) -> list[str]:
    """What Prefect checks when a run is created from the UI form (prefect.utilities.schema_tools)."""
    from prefect.utilities.schema_tools import validate

    try:
        validate(params, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    except Exception as exc:  # noqa: BLE001 - prefect's ValidationError
        return [str(exc)]
    return []


@pytest.mark.parametrize("config, ok", [
    ({"sweep": {"sparsities": [0.3, 0.5]}, "gamma": 6}, True),
    ({"sweep": {"patterns": ["unstructured", "2:4"]}}, True),
    ({"sweep": {"sparsities": [1.5]}}, False),
    ({"sweep": {"patterns": ["3:2"]}}, True),  # the regex admits it; N < M is checked when the flow starts
    ({"sweep": {"patterns": ["2-4"]}}, False),
    ({"sweep": {"methods": ["obs"]}}, False),
    ({"gamma": 0}, False),
    ({"eval_gammas": [0]}, False),
    ({"device": "gpu"}, False),
    ({"dtype": "fp8"}, False),
    ({"drafter_layers": "x"}, False),
    ({"train_steps": -4}, False),
])
def test_prefect_form_schema_carries_the_constraints(config, ok):
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import sd2_pipeline

    schema = parameter_schema(sd2_pipeline).model_dump_for_openapi()
    assert (not _schema_validate(schema, {"config": config})) is ok, config
    defs = schema["definitions"]
    assert defs["SweepGrid"]["properties"]["sparsities"]["items"]["exclusiveMaximum"] == 1.0
    assert defs["SweepGrid"]["properties"]["methods"]["items"]["enum"] == ["sparsegpt", "wanda", "magnitude"]


def test_form_and_cli_agree_on_n_below_m():
    """The one constraint the schema regex cannot state (N < M) is refused by the flow's own validation
    before any stage runs (the flow's parameters are validated by pydantic when the run starts)."""
    from pydantic import ValidationError

    from sd2.config import PipelineConfig

    with pytest.raises(ValidationError, match="N:M needs 0 < N < M"):
        PipelineConfig.model_validate({"sweep": {"patterns": ["3:2"]}})


@pytest.mark.parametrize("lines, needle", [
    (['{"question_id": 1, "category": "a", "turns": ["hi"]}', "{not json"], ":2:"),
    (['{"foo": 1}'], ":1:"),
    ([], "file has no records"),
])
def test_prompt_files(tmp_path, monkeypatch, tiny_model_dir, lines, needle):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "p.jsonl"
    f.write_text("".join(ln + "\n" for ln in lines))
    res = runner.invoke(app, ["eval", "--target", str(tiny_model_dir), "--drafter", str(tiny_model_dir),
                              "--prompts", str(f), "--out", "o.json"])
    _one_line_exit_2(res, needle)
    assert not (tmp_path / "o.json").exists()


def test_a_machine_without_a_c_compiler_gets_one_line_for_the_kernel_paths(tmp_path, monkeypatch, tiny_model_dir,
                                                                          fresh_kernel):
    """`--fast-path lean-fp16` needs sd2's C kernel built: no compiler → one line naming the alternatives, exit 2,
    no result written and nothing half-built left (`auto` picks `lean` there: test_numeric_paths)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    res = runner.invoke(app, ["eval", "--target", str(tiny_model_dir), "--drafter", str(tiny_model_dir),
                              "--fast-path", "lean-fp16", "--limit", "1", "--out", "o.json"])
    _one_line_exit_2(res, "--fast-path fp16/lean-fp16: building sd2's fp16 kernel needs a C compiler")
    assert "use --fast-path lean (fp32) or none" in res.output
    assert not (tmp_path / "o.json").exists() and not list((tmp_path / "home").rglob("*.so"))


def test_eval_shared_kv_with_a_drafter_that_cannot_read_the_targets_cache(tmp_path, monkeypatch, tiny_model_dir,
                                                                           tok300):
    from sd2.models import save_model
    from tests.conftest import make_llama

    monkeypatch.chdir(tmp_path)
    sliced = save_model(make_llama(len(tok300), layers=1, hidden=64, eos=tok300.eos_token_id), tok300,
                        tmp_path / "sliced")
    res = runner.invoke(app, ["eval", "--target", str(tiny_model_dir), "--drafter", str(sliced), "--shared-kv", "on",
                              "--limit", "1", "--out", "o.json"])
    _one_line_exit_2(res, "--shared-kv: the drafter cannot read the target's KV cache (layers 1 vs the target's 2, "
                     "and no map of the target layers it was cut from")
    assert not (tmp_path / "o.json").exists()
    res = runner.invoke(app, ["eval", "--target", str(tiny_model_dir), "--drafter", str(sliced), "--shared-kv",
                              "maybe", "--limit", "1", "--out", "o.json"])
    _one_line_exit_2(res, "shared-kv")


def test_distill_seed_file_without_answers_in_rewrite_mode(tmp_path, tiny_model_dir):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"prompt": "hello"}) + "\n")
    res = runner.invoke(app, ["distill", "--target", str(tiny_model_dir), "--prompts", str(f), "--mode", "rewrite",
                              "--out", str(tmp_path / "o")])
    _one_line_exit_2(res, "--mode rewrite")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_train_data_dir_that_is_not_a_dataset(tmp_path, tiny_model_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hi")
    res = runner.invoke(app, ["train", "--init", str(tiny_model_dir), "--data", str(tmp_path / "d"),
                              "--out", str(tmp_path / "o")])
    _one_line_exit_2(res, "--data")
    assert not (tmp_path / "o").exists()


def test_every_shipped_config_is_a_valid_pipeline_form():
    """configs/*.yaml are what users run (`sd2 pipeline --config`): each must validate as a PipelineConfig."""
    from sd2.config import PipelineConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = PipelineConfig.build(**yaml.safe_load(f.read_text()))
        resolved = cfg.resolved()
        assert cfg.name and resolved.train_steps is not None and resolved.sparse_ft_steps is not None
    features = PipelineConfig.build(**yaml.safe_load((root / "drafter-smollm2-features.yaml").read_text()))
    assert features.feature_drafter and not features.prune and features.reference_seeds
    sparse = PipelineConfig.build(**yaml.safe_load((root / "drafter-smollm2.yaml").read_text()))  # the recipe
    assert sparse.train_steps == 0 and sparse.prune and sparse.drafter_layers == "0--1" and sparse.draft_vocab
