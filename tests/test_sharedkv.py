"""Drafters over the target's KV cache (sd2.sharedkv): lossless on every engine path (greedy and sampling), the
drafted counts are the steps run, the training attention is the drafting one, a drafter trained so is marked and
evaluated that way, and a drafter that cannot read the target's cache is one clear error."""

import json

import pytest
import torch

from sd2 import sharedkv
from sd2.errors import UserError
from sd2.evaluate import apply_fast_path, evaluate_pair
from sd2.specdec import SpecDecoder
from tests.conftest import make_llama, perturbed
from tests.test_specdec import _exact_two_token_dist, _tv

PROMPT = [5, 17, 42, 8, 29, 3]


@pytest.mark.parametrize("path", ["none", "lean", "lean-fp16"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_over_the_targets_cache_equals_target_only(path, gamma):
    t = make_llama(96, layers=3, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.2, seed=gamma)
    t, d = apply_fast_path(path, t, d)
    base = SpecDecoder(t).generate(PROMPT, 40)
    res = SpecDecoder(t, d, gamma=gamma, shared_kv=True).generate(PROMPT, 40)
    assert res.tokens == base.tokens
    assert res.target_passes < len(res.tokens)  # drafts were accepted: the check is not trivial
    assert res.steps[0].drafted == 0  # nothing to read before the target's first pass
    assert all(0 <= s.accepted <= s.drafted <= gamma for s in res.steps)
    assert sum(1 + s.accepted for s in res.steps) == len(res.tokens)


@pytest.mark.parametrize("path", ["none", "lean-fp16"])
def test_a_copy_of_the_target_over_its_cache_accepts_everything(path):
    t = make_llama(96, seed=2, eos=None, hidden=32)
    t, d = apply_fast_path(path, t, perturbed(t, 0.0))
    res = SpecDecoder(t, d, gamma=4, shared_kv=True).generate(PROMPT, 41)
    assert [s.accepted for s in res.steps[1:]] == [4] * 8  # after the first pass every draft is the target's token


def test_the_drafter_reads_the_targets_keys_not_its_own():
    """A drafter whose own k/v projections are garbage drafts like the target over the target's cache (it
    computes its own only for the token it starts from and its drafts) and badly over its own."""
    t = make_llama(96, layers=2, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.0)
    with torch.no_grad():
        for layer in d.model.layers:
            layer.self_attn.k_proj.weight.mul_(-3.0)
            layer.self_attn.v_proj.weight.mul_(-3.0)
    own = SpecDecoder(t, d, gamma=4).generate(PROMPT, 40)
    shared = SpecDecoder(t, d, gamma=4, shared_kv=True).generate(PROMPT, 40)
    assert shared.tokens == own.tokens
    assert shared.mal > own.mal


def test_sampling_over_the_targets_cache_keeps_the_targets_distribution():
    V, T, N = 6, 1.0, 3000
    t = make_llama(V, seed=5, eos=None, hidden=16, std=0.6)
    d = perturbed(t, 0.8, seed=6)
    spec = SpecDecoder(t, d, gamma=2, temperature=T, shared_kv=True)
    runs = [spec.generate([1, 2, 3], 3, seed=s) for s in range(N)]
    first = max(range(V), key=lambda a: sum(r.tokens[0] == a for r in runs))
    kept = [r for r in runs if r.tokens[0] == first]  # tokens 2 and 3 given the first: the drafter drafted them
    assert all(r.steps[1].drafted == 1 for r in kept)
    emp: dict = {}
    for r in kept:
        emp[tuple(r.tokens[1:])] = emp.get(tuple(r.tokens[1:]), 0) + 1
    exact = _exact_two_token_dist(t, [1, 2, 3, first], T)
    assert _tv(emp, exact, len(kept)) < 0.08


def test_training_attention_is_the_drafting_attention():
    """With the target as its own drafter, attention over the target's keys/values of the past and its own at the
    current position is plain causal attention: the same logits."""
    t = make_llama(96, layers=2, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.0)
    ids = torch.randint(0, 96, (2, 12))
    kv, logits = sharedkv.target_kv(t, ids)
    sharedkv.use_for_training(d)
    out = d(input_ids=ids, sd2_target_kv=kv).logits
    assert torch.allclose(out, logits, atol=1e-5)
    d2 = perturbed(t, 0.3)  # another drafter: position 0 reads only itself, later ones the target's past
    sharedkv.use_for_training(d2)
    assert not torch.allclose(d2(input_ids=ids, sd2_target_kv=kv).logits, logits, atol=1e-3)


@pytest.mark.parametrize("rounds, offset", [(1, 0), (4, 0), (4, 3), (3, 1)])
def test_training_rounds_are_what_the_engine_drafts(rounds, offset):
    """Teacher-forced, position i of a training round is the drafter's draft step i - s + 1 of an engine round
    starting at s: its logits equal the engine's over the target's cache (HF path), every position."""
    from sd2.specdec import cached

    t = make_llama(96, layers=2, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.3, seed=4)
    ids = list(range(3, 19))
    kv, _ = sharedkv.target_kv(t, torch.tensor([ids]))
    dt = perturbed(d, 0.0)
    sharedkv.use_for_training(dt)
    train = dt(input_ids=torch.tensor([ids]), sd2_target_kv=kv, sd2_rounds=rounds, sd2_offset=offset).logits[0]
    starts = sharedkv.round_starts(len(ids), rounds, offset).tolist()
    assert len(set(starts)) == (len(ids) if rounds == 1 else len(range(offset, len(ids), rounds)) + (offset > 0))
    for s in sorted(set(starts)):
        tc = cached(t)
        if s:
            tc.forward(ids[:s], keep=1)
        dc = cached(d, share=tc)
        dc.follow()
        n = starts.count(s)
        eng = dc.forward(ids[: s + n], keep=n)
        dc.release()
        assert torch.allclose(eng, train[s: s + n], atol=1e-5), s


def test_a_drafter_of_other_shape_is_one_clear_error():
    t = make_llama(96, layers=3, seed=2)
    with pytest.raises(UserError, match=r"--shared-kv: .*layers 2 vs the target's 3.*pruned copy"):
        SpecDecoder(t, make_llama(96, layers=2, seed=2), shared_kv=True)
    t2, d2 = apply_fast_path("lean", t, perturbed(t, 0.1))
    d2.sd2_lean.native = object()  # a drafter on the kernel path beside a torch-path target: other cache layout
    with pytest.raises(UserError, match="different numeric paths"):
        SpecDecoder(t2, d2, gamma=2, shared_kv=True).generate(PROMPT, 8)


def test_eval_follows_the_drafters_mark(tok300):
    t = make_llama(300, layers=2, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.3)
    from sd2.data import Prompt

    prompts = [Prompt(id=str(i), category="c", text=txt) for i, txt in enumerate(["hello there", "tell me more"])]
    res, _ = evaluate_pair(t, tok300, d, tok300, prompts, gamma=3, max_new_tokens=16, progress=False,
                           fast_path="none", replay_gammas=[2, 3])
    assert res["shared_kv"] is False
    sharedkv.mark(d)
    res, _ = evaluate_pair(t, tok300, d, tok300, prompts, gamma=3, max_new_tokens=16, progress=False,
                           fast_path="none", replay_gammas=[2, 3])
    assert res["shared_kv"] is True and res["lossless"]
    chk = res["replay"]["engine_check"]
    assert chk["prompts_equal"] == chk["n_prompts"] == 2
    off, _ = evaluate_pair(t, tok300, d, tok300, prompts, gamma=3, max_new_tokens=16, progress=False,
                           fast_path="none", shared_kv="off")
    assert off["shared_kv"] is False
    from sd2 import eagle

    with pytest.raises(UserError, match="--shared-kv on: .*not a UAG or feature drafter"):
        evaluate_pair(t, tok300, eagle.build(t), tok300, prompts, gamma=3, max_new_tokens=8, progress=False,
                      fast_path="none", shared_kv="on")


def _train_shared_kv(tmp_path, target, seed_file):
    """`sd2 train --shared-kv ARGS` (2 steps) on 4 answers the target distilled: (invoke(init, out), CliRunner)."""
    from typer.testing import CliRunner

    from sd2.cli import app

    r = CliRunner()
    data = tmp_path / "data"
    assert r.invoke(app, ["distill", "--target", str(target), "--prompts", str(seed_file), "--out",
                          str(data), "--limit", "4", "--max-new-tokens", "8"]).exit_code == 0
    args = ["--data", str(data), "--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--loss", "kd",
            "--shared-kv", "--threads", "1"]
    return lambda init, out: r.invoke(app, ["train", "--init", str(init), "--out", str(out), *args])


def test_sd2_train_shared_kv_marks_the_drafter(tmp_path, tiny_model_dir, seed_file, sd2_home):
    out = tmp_path / "d"
    res = _train_shared_kv(tmp_path, tiny_model_dir, seed_file)(tiny_model_dir, out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())[sharedkv.MARK] is True
    assert "_attn_implementation" not in json.loads((out / "config.json").read_text())


def _slice(t, keep: list[int], scale: float, seed: int = 1):
    """A drafter cut from (a perturbed copy of) the target, keeping `keep`, marked to read those layers' caches."""
    from sd2.prune.layers import keep_layers

    d = keep_layers(perturbed(t, scale, seed=seed), keep)
    sharedkv.mark(d, keep)
    return d


@pytest.mark.parametrize("path", ["none", "lean", "lean-fp16"])
def test_a_layer_slice_over_the_targets_cache_is_lossless(path):
    t = make_llama(96, layers=4, seed=2, eos=None, hidden=32)
    t, d = apply_fast_path(path, t, _slice(t, [0, 3], 0.1))
    base = SpecDecoder(t).generate(PROMPT, 40)
    res = SpecDecoder(t, d, gamma=4, shared_kv=True).generate(PROMPT, 40)
    assert res.tokens == base.tokens
    assert res.target_passes < len(res.tokens)
    assert sum(1 + s.accepted for s in res.steps) == len(res.tokens)


@pytest.mark.parametrize("path", ["none", "lean"])
def test_a_layer_slice_reads_the_target_layers_it_was_cut_from(path):
    """Slice layer j reads target layer keep[j]'s cache in the engine (HF modules and the lean session) exactly as
    training's attention does: teacher-forced logits equal the engine's round by round."""
    from sd2.specdec import cached

    keep, rounds = [0, 2], 4
    t = make_llama(96, layers=3, seed=2, eos=None, hidden=32)
    d = _slice(t, keep, 0.3, seed=4)
    ids = list(range(3, 19))
    kv, _ = sharedkv.target_kv(t, torch.tensor([ids]))
    dt = perturbed(d, 0.0)
    sharedkv.use_for_training(dt, sharedkv.kv_layers(dt.config))
    train = dt(input_ids=torch.tensor([ids]), sd2_target_kv=kv, sd2_rounds=rounds, sd2_offset=0).logits[0]
    wrong = perturbed(d, 0.0)
    sharedkv.use_for_training(wrong)  # reading target layers 0, 1 instead: other logits
    assert not torch.allclose(wrong(input_ids=torch.tensor([ids]), sd2_target_kv=kv, sd2_rounds=rounds).logits[0],
                              train, atol=1e-3)
    te, de = apply_fast_path(path, t, d)
    for s in range(0, len(ids), rounds):
        tc = cached(te, capacity=64)
        if s:
            tc.forward(ids[:s], keep=1)
        dc = cached(de, share=tc)
        dc.follow()
        if path == "none":
            with sharedkv.reading_target_layers(de):
                eng = dc.forward(ids[: s + rounds], keep=rounds)
        else:
            eng = dc.forward(ids[: s + rounds], keep=rounds)
        dc.release()
        assert torch.allclose(eng, train[s: s + rounds], atol=1e-4), s
    assert [a.self_attn.layer_idx for a in de.model.layers] == [0, 1]  # restored after drafting


def test_a_slice_without_its_map_is_one_clear_error():
    from sd2.prune.layers import keep_layers

    t = make_llama(96, layers=3, seed=2)
    with pytest.raises(UserError, match=r"--shared-kv: .*layers 2 vs the target's 3, and no map .*sd2_layers.json"):
        SpecDecoder(t, keep_layers(t, [0, 2]), shared_kv=True)
    d = keep_layers(t, [0, 2])
    sharedkv.mark(d, [0, 5])
    with pytest.raises(UserError, match=r"map onto target layers \[0, 5\]"):
        SpecDecoder(t, d, shared_kv=True)
    sliced_again = keep_layers(_slice(t, [0, 2], 0.0), [1])  # the map follows the layers kept
    assert sharedkv.kv_layers(sliced_again.config) == [2]


def test_sd2_train_shared_kv_on_a_layer_slice_keeps_its_map(tmp_path, tiny_model_dir, seed_file, sd2_home):
    from sd2.prune.layers import layer_prune_to_dir

    train = _train_shared_kv(tmp_path, tiny_model_dir, seed_file)
    sl = tmp_path / "slice"
    layer_prune_to_dir(str(tiny_model_dir), sl, keep_layers="1", device="cpu")
    out = tmp_path / "d"
    res = train(sl, out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[sharedkv.MARK] is True and cfg[sharedkv.LAYERS] == [1]
    # the pipeline's layer-pruned baselines read the target's cache only where this holds (a slice of a copy)
    assert sharedkv.slice_can_read(str(tiny_model_dir), sl)
    again = tmp_path / "slice-of-slice"
    layer_prune_to_dir(str(sl), again, keep_layers="0", device="cpu")
    assert not sharedkv.slice_can_read(str(tiny_model_dir), again)
    (sl / "sd2_layers.json").unlink()  # a slice that does not say where it was cut from: one line, nothing written
    res = train(sl, tmp_path / "d2")
    assert res.exit_code == 2 and "no map of the target layers" in res.output
    assert not (tmp_path / "d2").exists() and not (tmp_path / "d2.partial").exists()
