"""Feature drafters (sd2.eagle): lossless decoding on every path, training, save/load, replay = engine."""

from __future__ import annotations

import json

import pytest
import torch

from sd2 import eagle, lean
from sd2.models import load_model, save_model
from sd2.specdec import SpecDecoder
from tests.conftest import make_llama


def _prompt(seed: int, vocab: int = 300, n: int = 7) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _trained_like(target):
    """A feature drafter that agrees with the target often: its layer's output is the target's feature path
    (the test needs acceptance > 0 at several positions, not a trained model)."""
    d = eagle.build(target)
    with torch.no_grad():
        d.model.layers[0].mlp.down_proj.weight.mul_(0.1)
    return d


@pytest.mark.parametrize("path", ["hf", "lean", "lean-fp16"])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_feature_drafting_is_lossless(path, gamma):
    t = make_llama(300, layers=3, std=0.2)
    d = _trained_like(t)
    if path != "hf":
        lean.attach(t, path == "lean-fp16")
        lean.attach(d, path == "lean-fp16")
    base = SpecDecoder(t, None)
    spec = SpecDecoder(t, d, gamma=gamma)
    for seed in range(3):
        b, s = base.generate(_prompt(seed), 30), spec.generate(_prompt(seed), 30)
        assert s.tokens == b.tokens
        assert s.steps[0].drafted == 0  # the first step has no target features yet
        assert all(st.drafted <= gamma and st.accepted <= st.drafted for st in s.steps)
        assert len(s.tokens) == sum(st.accepted + 1 for st in s.steps)


def _exact_dist(t, prompt: list[int], n: int) -> dict:
    """The target's exact distribution over its next n tokens (temperature 1)."""
    dist = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            nxt = {}
            for seq, pr in dist.items():
                p = torch.softmax(t(torch.tensor([prompt + list(seq)])).logits[0, -1], -1)
                for a in range(p.numel()):
                    nxt[seq + (a,)] = pr * float(p[a])
            dist = nxt
    return dist


def test_feature_drafting_keeps_the_sampling_distribution():
    """The engine's TV check: three sampled tokens (the first from the prefill, then a drafted step) against the
    target's exact three-token distribution."""
    t = make_llama(4, layers=2, seed=5, eos=None, hidden=16, std=0.6)
    d = eagle.build(t)
    with torch.no_grad():
        for p in d.parameters():  # a drafter that disagrees with the target often
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5 * p.std().clamp(min=1e-3))
    exact = _exact_dist(t, [1, 2, 3], 3)
    spec = SpecDecoder(t, d, gamma=2, temperature=1.0)
    n, emp, drafted = 4000, {}, 0
    for seed in range(n):
        r = spec.generate([1, 2, 3], 3, seed=seed)
        emp[tuple(r.tokens)] = emp.get(tuple(r.tokens), 0) + 1
        drafted += sum(st.drafted for st in r.steps)
    assert drafted >= n  # every run drafted at its second step: the check is about drafted tokens
    tv = 0.5 * sum(abs(emp.get(k, 0) / n - exact.get(k, 0.0)) for k in set(emp) | set(exact))
    assert tv < 0.08, f"speculative samples deviate from the target: TV={tv:.3f}"


def test_lean_feature_forward_matches_the_modules():
    t = make_llama(300, layers=2, std=0.2)
    d = _trained_like(t)
    ids = _prompt(0, n=9)
    with torch.no_grad():
        feats = eagle.target_features(t, torch.tensor([ids]))[0]
        ref = d(input_ids=torch.tensor([ids[1:]]), feats=feats[None, :-1])
    lean.attach(t)
    lean.attach(d)
    logits, h = t.sd2_lean.session(32).forward(ids, keep=len(ids), hidden=True)
    assert torch.allclose(h, feats, atol=1e-4)
    dl, dh = d.sd2_lean.session(32).forward(ids[1:], keep=len(ids) - 1, feats=feats[:-1], hidden=True)
    assert torch.allclose(dl, ref.logits[0], atol=1e-4) and torch.allclose(dh, ref.hidden_states[0][0], atol=1e-4)


def test_save_load_round_trip_and_plain_transformers(tmp_path, tok300):
    from transformers import AutoModelForCausalLM

    t = make_llama(len(tok300), layers=2, std=0.2)
    d = _trained_like(t)
    save_model(d, tok300, tmp_path / "fd")
    back, _ = load_model(str(tmp_path / "fd"))
    assert eagle.is_feature_drafter(back) and back.config.num_hidden_layers == 1
    for a, b in zip(d.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fd")  # a one-layer Llama to plain transformers
    assert plain.config.num_hidden_layers == 1


def test_non_llama_target_is_refused():
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    from sd2.errors import UserError

    g = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(UserError, match="Llama-family"):
        eagle.build(g)


def test_train_a_feature_drafter(tiny_model_dir, seed_file, tmp_path, sd2_home):
    """Build from the target, features once, KD from the target's head + feature regression; the result is a
    lossless drafter and a resumed run continues it."""
    from sd2.config import DistillConfig, TrainConfig
    from sd2.distill import distill
    from sd2.train import train

    data = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "d", limit=6,
                                 max_new_tokens=12, batch_size=3), progress=False)
    ref = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "r", limit=8,
                                mode="reference"), progress=False)
    cfg = dict(init=str(tiny_model_dir), data=data, extra_data=[ref], out=tmp_path / "m", max_steps=6, batch_size=2,
               seq_len=48,
               loss="kd", lr=1e-3, save_steps=3, feature_drafter=True, feature_noise=0.05, packing=True,
               feature_unroll=True, draft_vocab=64)
    out = train(TrainConfig(**cfg), progress=False)
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["feature_drafter"] and info["kd_teacher"] == "live" and info["draft_vocab"] == 64
    assert info["data"]["rows"] == 6 + 8  # the distilled rows and the seed answers
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses and all(v == v and v > 0 for v in losses)
    d, _ = load_model(str(out))
    assert eagle.is_feature_drafter(d) and d.get_output_embeddings().weight.shape[0] == 64
    target, tok = load_model(str(tiny_model_dir))
    prompt = tok("the quick brown fox")["input_ids"]
    base = SpecDecoder(target).generate(prompt, 16).tokens
    assert SpecDecoder(target, d, gamma=3).generate(prompt, 16).tokens == base
    again = train(TrainConfig(**{**cfg, "max_steps": 8, "resume": True}), progress=False)
    assert json.loads((again / "sd2_train.json").read_text())["global_step"] == 8
    cache = sd2_home / "cache" / "features"
    assert len(list(cache.glob("*.safetensors"))) == 2  # one per data source, computed once, then reused
    other = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "d2", limit=4,
                                  max_new_tokens=12, batch_size=2), progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    train(TrainConfig(**{**cfg, "data": other, "out": tmp_path / "m2", "max_steps": 2}), progress=False)
    after = {f.name: f.stat().st_mtime_ns for f in cache.glob("*.safetensors")}
    assert len(after) == 3 and all(after[k] == v for k, v in before.items())  # the seed answers' entry reused


def test_feature_loss_selects_positions():
    pred = torch.zeros(1, 4, 3, requires_grad=True)
    feats = torch.ones(1, 4, 3)
    sel = torch.tensor([[True, False, False, True]])
    loss = eagle.feature_loss(pred, feats, sel)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.5)  # smooth-L1 of a unit error
    assert pred.grad[0, 1].abs().sum() == 0 and pred.grad[0, 0].abs().sum() > 0
    assert float(eagle.feature_loss(pred, feats, torch.zeros(1, 4, dtype=torch.bool)).detach()) == 0


@pytest.mark.parametrize("path", ["hf", "lean"])
def test_replay_equals_the_engine(path):
    from sd2.evaluate import _replayer
    from sd2.specdec import eos_ids

    t = make_llama(300, layers=3, std=0.2)
    d = _trained_like(t)
    if path == "lean":
        lean.attach(t)
        lean.attach(d)
    eos = eos_ids(t)
    accepted = 0
    for gamma in (1, 3, 4):
        for seed in range(4):
            prompt = _prompt(seed)
            ref = SpecDecoder(t, d, gamma=gamma).generate(prompt, 40)
            base = SpecDecoder(t).generate(prompt, 40).tokens
            rep = _replayer(t, d, prompt, base, 40, eos)(gamma)
            assert [(s.drafted, s.accepted) for s in rep.steps] == [(s.drafted, s.accepted) for s in ref.steps]
            assert rep.target_passes == ref.target_passes and rep.tokens == ref.tokens
            accepted += sum(s.accepted for s in ref.steps)
    assert accepted > 0  # the drafter agrees sometimes: the comparison is not trivial


def test_unrolled_training_forward_is_the_engines_second_step():
    """The training-time-test forward: its second-step logits at pair i equal a cached forward over the true pairs
    0..i followed by (x_{i+2}, the drafter's own feature of pair i) — what the engine's second draft step computes."""
    from sd2.specdec import cached

    t = make_llama(300, layers=2, std=0.2)
    d = _trained_like(t)
    ids = torch.tensor([_prompt(1, n=10)])
    with torch.no_grad():
        f = eagle.target_features(t, ids)
        n = ids.shape[1] - 1
        first, logits1, _, logits2 = eagle.unrolled_forward(d, ids, f[:, :-1], torch.ones_like(ids))
        h1 = first.hidden_states[0]
    assert torch.allclose(logits1[0], first.logits[0], atol=1e-5)
    for i in (0, 3, n - 2):
        c = cached(d)
        c.forward(ids[0, 1: i + 2].tolist(), keep=1, feats=f[0, : i + 1])
        step2 = c.forward(ids[0, 1: i + 3].tolist(), keep=1, feats=h1[0, i: i + 1])
        assert torch.allclose(step2[-1], logits2[0, i], atol=1e-4)


@pytest.mark.parametrize("path", ["hf", "lean"])
def test_multi_layer_features_are_lossless_and_replay_exactly(path):
    """EAGLE-3-style reads (a low, a mid and the final layer): the target returns them on every path, the drafter
    reduces them, decoding stays lossless and the replay matches the engine."""
    from sd2.evaluate import _replayer
    from sd2.specdec import cached, eos_ids

    t = make_llama(300, layers=4, std=0.2)
    d = eagle.build(t, reads=(0, 2, -1))
    assert eagle.feature_layers(d.config) == (0, 2, -1) and d.eagle_reduce.weight.shape == (32, 96)
    with torch.no_grad():
        d.model.layers[0].mlp.down_proj.weight.mul_(0.1)
        d.eagle_reduce.weight.add_(0.01)
    ids = _prompt(2, n=8)
    ref = eagle.target_features(t, torch.tensor([ids]), reads=(0, 2, -1))[0]
    if path == "lean":
        lean.attach(t)
        lean.attach(d)
    _, h = cached(t).forward(ids, keep=1, hidden=(0, 2, -1))
    assert h.shape == (8, 96) and torch.allclose(h, ref, atol=1e-4)
    eos = eos_ids(t)
    for gamma in (1, 4):
        for seed in range(3):
            prompt = _prompt(seed)
            base = SpecDecoder(t).generate(prompt, 30).tokens
            spec = SpecDecoder(t, d, gamma=gamma).generate(prompt, 30)
            assert spec.tokens == base
            rep = _replayer(t, d, prompt, base, 30, eos)(gamma)
            assert [(s.drafted, s.accepted) for s in rep.steps] == [(s.drafted, s.accepted) for s in spec.steps]


def test_bad_feature_options_are_one_line_errors(tiny_model_dir, seed_file, tmp_path):
    from typer.testing import CliRunner

    from sd2.cli import app

    data = tmp_path / "d"
    r = CliRunner().invoke(app, ["distill", "--target", str(tiny_model_dir), "--prompts", str(seed_file), "--out",
                                 str(data), "--limit", "2", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    for extra, msg in ((["--feature-reads", "7"], "--feature-reads 7: the target has 2 layers"),
                       (["--feature-reads", "x"], "feature-reads: layer indices separated by commas"),
                       (["--feature-layers", "3"], "--feature-layers 3")):
        r = CliRunner().invoke(app, ["train", "--init", str(tiny_model_dir), "--data", str(data), "--out",
                                     str(tmp_path / "o"), "--feature-drafter", "--max-steps", "1", *extra])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
