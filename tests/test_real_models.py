"""End-to-end on the real packaged SmolLM2-135M-Instruct (converted once per SD2_HOME, then cached)."""

import json
import logging
import math

import pytest
from typer.testing import CliRunner

from sd2 import models
from sd2.cli import app
from sd2.data import encode_prompt, load_prompts
from sd2.specdec import SpecDecoder

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    m, tok = models.load_model(ALIAS)
    return m, tok


def test_packaged_alias_is_cached_as_safetensors(smol, monkeypatch):
    m, tok = smol
    d = models.packaged_dir(ALIAS)
    assert (d / "model.safetensors").exists() and (d / "config.json").exists()
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576 and m.config.vocab_size == 49152
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert tok.chat_template

    def boom(*a, **k):
        raise AssertionError("second load touched the GGUF")

    monkeypatch.setattr(models, "_fetch_gguf", boom)
    monkeypatch.setattr(models, "_convert_gguf", boom)
    m2, _ = models.load_model(ALIAS)
    assert m2.config.num_hidden_layers == 30


def test_identical_drafter_real_model_mal_gamma_plus_one(smol):
    m, tok = smol
    gamma = 4
    for p in load_prompts(None, limit=2):
        ids = encode_prompt(tok, p.text)
        base = SpecDecoder(m, target_tokenizer=tok).generate(ids, 20)
        res = SpecDecoder(m, m, gamma=gamma, target_tokenizer=tok).generate(ids, 20)
        assert res.tokens == base.tokens
        assert res.target_passes == math.ceil(len(res.tokens) / (gamma + 1))


def test_layer_pruned_drafter_eval_cli(tmp_path):
    runner = CliRunner()
    d = tmp_path / "drafter"
    r = runner.invoke(app, ["layer-prune", "--model", ALIAS, "--keep-layers", "0-9,29", "--out", str(d)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", "--target", ALIAS, "--drafter", str(d), "--limit", "2", "--max-new-tokens", "16",
                            "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n_prompts"] == 2 and res["lossless"] is True
    assert 1.0 <= res["mal"] <= 5.0
    assert 0.3 < res["cost_ratio"] < 0.6  # 11 of 30 layers plus the shared embeddings/lm_head


def test_magpie_user_turns_from_the_real_chat_template(smol, caplog):
    """The target writes finished, distinct user requests itself from its chat template's user prefix (and says how
    far it is where nobody watches a terminal)."""
    from sd2.distill import user_prefix, user_turns

    m, tok = smol
    prefix = tok.decode(user_prefix(tok))
    assert prefix.rstrip().endswith("user")  # SmolLM2: ...<|im_start|>user\n
    with caplog.at_level(logging.INFO, logger="sd2.progress"):
        turns = user_turns(m, tok, 4, batch_size=4, seed=0, max_new_tokens=64, progress=False)
    assert 1 <= len(turns) <= 4
    lines = [r.getMessage() for r in caplog.records if r.name == "sd2.progress"]
    assert lines[0].startswith("magpie seeds: 0/4") and lines[-1].startswith(f"magpie seeds: {len(turns)}/4")
    assert len({t.text for t in turns}) == len(turns) and all(t.text.strip() for t in turns)
    assert all(t.category == "magpie" and t.reference is None for t in turns)
    from sd2.distill import TASK_OPENERS

    steered = user_turns(m, tok, 4, batch_size=4, seed=0, max_new_tokens=64, openers=TASK_OPENERS[:3])
    opened = [t for t in steered if any(t.text.startswith(o.strip()) for o in TASK_OPENERS[:3])]
    assert opened and len(steered) - len(opened) <= 1  # 3 of every 4 samples start from an opener, one is free
    assert all(len(t.text) > len(o) for t in opened for o in TASK_OPENERS[:3] if t.text.startswith(o.strip()))
