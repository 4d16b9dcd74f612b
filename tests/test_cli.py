"""CLI contract on tiny local models: eval JSON keys, layer-prune, macs, and one-line errors (exit 2)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sd2.cli import app
from sd2.models import load_model, save_model
from tests.conftest import make_llama, make_tokenizer, perturbed

runner = CliRunner()

EVAL_KEYS = {"target", "drafter", "gamma", "temperature", "max_new_tokens", "n_prompts", "mal", "mal_ci95",
             "acceptance_rate", "per_position_acceptance", "target_tokens_per_s", "spec_tokens_per_s", "speedup",
             "target_macs_per_token", "drafter_macs_per_token", "cost_ratio", "theoretical_speedup", "lossless",
             "per_category", "numeric_path", "verify_cost_ratio", "drafter_time_ratio", "predicted_speedup",
             "target_forward_ms", "shared_kv", "prompt_vocab", "target_weight_bytes_per_token",
             "drafter_weight_bytes_per_token", "drafter_nonzero_bytes_per_token", "weight_bytes_ratio"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(300)
    t = make_llama(len(tok), layers=4, seed=1, eos=tok.eos_token_id)
    save_model(t, tok, root / "target")
    save_model(perturbed(t, 0.7), tok, root / "drafter")
    tok2 = make_tokenizer(400)
    save_model(make_llama(len(tok2), layers=1, seed=2, eos=tok2.eos_token_id), tok2, root / "other")
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"the quick fox {i}"]}) + "\n"
                               for i, c in enumerate(["a", "b", "a", "b"])))
    return root


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _eval_args(tiny, out, *extra):
    return ("eval", "--target", tiny / "target", "--drafter", tiny / "drafter", "--prompts", tiny / "p.jsonl",
            "--max-new-tokens", 16, "--out", out, *extra)


def test_eval_writes_contract_json(tiny, tmp_path):
    out = tmp_path / "r.json"
    code, text = _run(*_eval_args(tiny, out, "--gamma", 3))
    assert code == 0, text
    res = json.loads(out.read_text())
    assert set(res) == EVAL_KEYS
    assert res["n_prompts"] == 4 and res["gamma"] == 3 and res["lossless"] is True
    assert len(res["per_position_acceptance"]) == 3
    assert 1.0 <= res["mal"] <= 4.0 and res["mal_ci95"][0] <= res["mal"] <= res["mal_ci95"][1]
    assert set(res["per_category"]) == {"a", "b"} and res["per_category"]["a"]["n_prompts"] == 2
    assert res["cost_ratio"] == pytest.approx(1.0)
    assert res["theoretical_speedup"] == pytest.approx(res["mal"] / 4)
    # the measured cost model: positive, and the predicted speedup follows from it
    assert res["verify_cost_ratio"] > 0 and res["drafter_time_ratio"] > 0 and res["target_forward_ms"] > 0
    assert res["predicted_speedup"] == pytest.approx(
        res["mal"] / (3 * res["drafter_time_ratio"] + res["verify_cost_ratio"]))
    # a perturbed copy: as many weight bytes as the target, all nonzero
    assert res["weight_bytes_ratio"] == pytest.approx(1.0)
    assert res["drafter_nonzero_bytes_per_token"] > res["drafter_weight_bytes_per_token"] > 0
    assert (tmp_path / "r.records.csv").exists()


def test_eval_uag_needs_flag_then_works(tiny, tmp_path):
    out = tmp_path / "u.json"
    args = ("eval", "--target", tiny / "target", "--drafter", tiny / "other", "--prompts", tiny / "p.jsonl",
            "--max-new-tokens", 12, "--limit", 2, "--out", out)
    code, text = _run(*args)
    assert code == 2 and "--uag" in text and not out.exists()
    code, text = _run(*args, "--uag")
    assert code == 0, text
    res = json.loads(out.read_text())
    assert res["lossless"] is True and res["cost_ratio"] > 0


@pytest.mark.parametrize("extra,needle", [
    (("--gamma", 0), "gamma"),
    (("--temperature", -0.5), "temperature"),
    (("--limit", 0), "limit"),
    (("--categories", "zzz"), "--categories"),
])
def test_eval_bad_input_one_line_exit_2(tiny, tmp_path, extra, needle):
    out = tmp_path / "bad.json"
    code, text = _run(*_eval_args(tiny, out, *extra))
    assert code == 2, text
    assert needle in text and len(text.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_models_and_prompts(tiny, tmp_path):
    out = tmp_path / "x.json"
    base = ("eval", "--target", tiny / "target", "--prompts", tiny / "p.jsonl", "--out", out)
    for drafter, needle in [("no-such-alias", "not a packaged alias"), (tmp_path / "missing", "not an existing"),
                            (tmp_path, "no config.json")]:
        code, text = _run(*base, "--drafter", drafter)
        assert code == 2 and needle in text, text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{oops\n')
    code, text = _run("eval", "--target", tiny / "target", "--drafter", tiny / "drafter", "--prompts", bad,
                      "--out", out)
    assert code == 2 and "bad.jsonl:2" in text
    assert not out.exists()


def test_pickle_weights_refused_unless_allowed(tiny, tmp_path):
    m, tok = load_model(str(tiny / "target"))
    d = tmp_path / "pickled"
    d.mkdir()
    m.config.save_pretrained(d)
    tok.save_pretrained(d)
    torch.save(m.state_dict(), d / "pytorch_model.bin")  # a pickle checkpoint, as older tools write
    code, text = _run(*("eval", "--target", tiny / "target", "--drafter", d, "--prompts", tiny / "p.jsonl",
                        "--out", tmp_path / "p.json"))
    assert code == 2 and "--allow-pickle" in text


def test_layer_prune_and_macs(tiny, tmp_path):
    out = tmp_path / "lp"
    code, text = _run("layer-prune", "--model", tiny / "target", "--keep-layers", "0,2-3", "--out", out)
    assert code == 0, text
    m, _ = load_model(str(out))
    t, _ = load_model(str(tiny / "target"))
    assert m.config.num_hidden_layers == 3
    torch.testing.assert_close(m.model.layers[1].mlp.down_proj.weight, t.model.layers[2].mlp.down_proj.weight)
    code, text = _run("layer-prune", "--model", tiny / "target", "--keep-layers", "0,2-3", "--out", out)
    assert code == 2 and "--overwrite" in text
    code, text = _run("layer-prune", "--model", tiny / "target", "--keep-layers", "0-9", "--out", tmp_path / "n")
    assert code == 2 and "outside" in text and not (tmp_path / "n").exists()
    code, text = _run("macs", "--model", out, "--context", 64)
    assert code == 0, text
    res = json.loads(text)
    assert res["macs_per_token"] == res["linear_macs"] + res["attention_macs"]


def test_eval_fast_path(tiny, tmp_path):
    out = tmp_path / "f.json"
    code, text = _run(*_eval_args(tiny, out, "--fast-path", "drafter-fp16", "--limit", 2))
    assert code == 0, text
    res = json.loads(out.read_text())
    assert res["lossless"] is True and "fp16" in res["numeric_path"]
    code, text = _run(*_eval_args(tiny, tmp_path / "g.json", "--fast-path", "int3"))
    assert code == 2 and "fast-path" in text and not (tmp_path / "g.json").exists()


def test_unreachable_servers_one_line(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")
    code, text = _run("compare")
    assert code == 2 and "MLFLOW_TRACKING_URI" in text and len(text.strip().splitlines()) == 1
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{dead}/api")
    (tmp_path / "ok.yaml").write_text("profile: tiny\n")  # a valid config: the server is checked after the form
    code, text = _run("pipeline", "--config", str(tmp_path / "ok.yaml"))
    assert code == 2 and "PREFECT_API_URL" in text


def test_unwritable_output_is_one_line(tiny):
    """sysfs refuses new files even to root: the permission error names the path, on one line."""
    code, text = _run("layer-prune", "--model", tiny / "target", "--keep-layers", "0", "--out", "/sys/sd2-test/x")
    assert code == 2, text
    assert "/sys/sd2-test" in text and len(text.strip().splitlines()) == 1


def test_eval_dynamic_draft_length(tiny, tmp_path):
    out = tmp_path / "d.json"
    code, text = _run(*_eval_args(tiny, out, "--draft-threshold", 0.6, "--limit", 2))
    assert code == 0, text
    res = json.loads(out.read_text())
    assert res["lossless"] is True and res["draft_threshold"] == 0.6 and 0 <= res["mean_drafted"] <= 4
    code, text = _run(*_eval_args(tiny, tmp_path / "e.json", "--draft-threshold", 1.5))
    assert code == 2 and "draft-threshold" in text and not (tmp_path / "e.json").exists()


def test_eval_with_prompt_lookup(tiny, tmp_path):
    out = tmp_path / "l.json"
    code, text = _run(*_eval_args(tiny, out, "--lookup", 1, "--limit", 2, "--replay-gammas", "2,4"))
    assert code == 0, text
    res = json.loads(out.read_text())
    assert res["lossless"] is True and res["lookup"] == 1 and 0 <= res["lookup_step_share"] <= 1
    assert res["replay"]["engine_check"]["prompts_equal"] == res["replay"]["engine_check"]["n_prompts"]
    code, text = _run(*_eval_args(tiny, tmp_path / "e.json", "--lookup", 7))
    assert code == 2 and "lookup" in text and len(text.strip().splitlines()) == 1 and not (tmp_path / "e.json").exists()
