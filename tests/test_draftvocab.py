"""Draft vocabulary (compact drafter head + map) and KD from stored top-k teacher logits."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
import torch
import transformers

from sd2 import draftvocab
from sd2.metrics import macs_per_token
from sd2.models import load_model, save_model
from sd2.specdec import SpecDecoder, hf_assisted_generate
from sd2.train import IGNORE, kd_loss, topk_kd_loss
from tests.conftest import make_llama, perturbed
from tests.test_specdec import PROMPT, sampled_tv


def _compact(model, k: int, seed: int = 0):
    ids = sorted(torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return draftvocab.compact_head(model, ids), ids


@pytest.mark.parametrize("seed", range(3))
def test_compact_head_decoding_is_lossless(seed):
    t = make_llama(96, seed=seed, eos=7)
    d, _ = _compact(perturbed(t, 0.4, seed=seed), 40, seed)
    assert d.get_output_embeddings().weight.shape[0] == 40
    base = SpecDecoder(t).generate(PROMPT, 40)
    for gamma in (1, 3, 5):
        res = SpecDecoder(t, d, gamma=gamma).generate(PROMPT, 40)
        assert res.tokens == base.tokens


def test_compact_head_keeps_the_sampling_distribution():
    t = make_llama(6, seed=5, eos=None, hidden=16, std=0.6)
    d = draftvocab.compact_head(make_llama(6, seed=6, eos=None, hidden=16, std=0.6), [0, 2, 3, 5])
    assert sampled_tv(t, d) < 0.06


def test_only_draft_tokens_are_proposed():
    t = make_llama(64, seed=3, eos=None)
    d, ids = _compact(perturbed(t, 0.3, seed=3), 12)
    from sd2.specdec import _SameVocabProposer

    prop = _SameVocabProposer(d, set(), 0.0, None)
    drafts, _ = prop.propose(PROMPT, 6)
    assert len(drafts) == 6 and set(drafts) <= set(ids)


def test_layer_pruning_keeps_the_compact_head(tmp_path, tok300):
    """Dropping layers of a compact-head drafter (the pipeline's layer-pruned baseline) keeps its head rows and map,
    and the result saves and loads with them."""
    from sd2.prune.layers import keep_layers

    t = make_llama(len(tok300), layers=3, seed=1, hidden=64)
    d, ids = _compact(perturbed(t, 0.2, seed=2), 64)
    lp = keep_layers(d, [0, 2])
    assert lp.config.num_hidden_layers == 2 and draftvocab.draft_ids(lp).tolist() == ids
    assert torch.equal(lp.get_output_embeddings().weight, d.get_output_embeddings().weight)
    save_model(lp, tok300, tmp_path / "lp")
    back, _ = load_model(str(tmp_path / "lp"))
    assert draftvocab.draft_ids(back).tolist() == ids
    x = torch.tensor([PROMPT])
    assert torch.allclose(back(x).logits, lp(x).logits, atol=1e-5)


def test_map_round_trips_through_save_load_and_plain_transformers(tmp_path, tok300):
    t = make_llama(len(tok300), layers=2, seed=1, eos=tok300.eos_token_id, hidden=64)
    d, ids = _compact(perturbed(t, 0.2, seed=2), 64)
    compact_w = d.get_output_embeddings().weight.detach().clone()
    save_model(d, tok300, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / draftvocab.FILE).read_text())
    assert meta["draft_ids"] == ids and meta["vocab_size"] == len(tok300)
    back, _ = load_model(str(tmp_path / "d"))
    assert draftvocab.draft_ids(back).tolist() == ids
    assert torch.equal(back.get_output_embeddings().weight, compact_w)
    # MACs count the compact head: K rows, not V
    full_macs = macs_per_token(perturbed(t, 0.2, seed=2))["linear_macs"]
    assert full_macs - macs_per_token(back)["linear_macs"] == (len(tok300) - 64) * 64
    # plain transformers loads the folder (full-size head, zero rows outside the map) and uses it as assistant
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    head = plain.get_output_embeddings().weight
    assert head.shape[0] == len(tok300) and torch.equal(head[ids], compact_w)
    others = torch.ones(len(tok300), dtype=torch.bool)
    others[ids] = False
    assert head[others].abs().sum() == 0
    prompt = tok300("the quick brown fox")["input_ids"]
    base = SpecDecoder(t).generate(prompt, 20).tokens
    inp = torch.tensor([prompt])
    out = t.generate(inp, attention_mask=torch.ones_like(inp), assistant_model=plain, do_sample=False,
                     max_new_tokens=20)
    assert out[0, len(prompt):].tolist()[:len(base)] == base
    # sd2's own HF-assisted baseline widens the compact head for HF the same way
    assert hf_assisted_generate(t, back, prompt, gamma=3, max_new_tokens=20).tokens[:len(base)] == base


def test_choose_is_frequency_ordered_and_bounded():
    counts = Counter({5: 10, 9: 7, 2: 7, 40: 1})
    assert draftvocab.choose(counts, 3, 50, always={0}) == [0, 2, 5]
    assert draftvocab.choose(counts, 6, 50) == [0, 1, 2, 5, 9, 40]  # unseen ids fill by lowest id
    for bad in (0, 51):
        with pytest.raises(Exception, match="--draft-vocab"):
            draftvocab.choose(counts, bad, 50)


def test_labels_map_into_the_compact_head():
    dmap = torch.tensor([3, 7, 9])
    labels = torch.tensor([[IGNORE, 7, 3, 4, 9]])
    assert draftvocab.to_draft(labels, dmap, 12).tolist() == [[IGNORE, 1, 0, IGNORE, 2]]


def _stored(teacher: torch.Tensor, k: int):
    """Top-k rows as distill stores them: row j is the teacher at the position that predicts token j."""
    vals, idx = teacher.topk(k, -1)
    return (torch.cat([torch.zeros_like(idx[:, :1]), idx[:, :-1]], 1),
            torch.cat([torch.full_like(vals[:, :1], float("-inf")), vals[:, :-1]], 1))


def test_stored_topk_kd_equals_live_kd():
    """With k = V the stored loss is the live one; with small k it is close (the mass it drops is small)."""
    torch.manual_seed(0)
    B, T, V = 2, 7, 50
    student = torch.randn(B, T, V)
    teacher = torch.randn(B, T, V) * 3
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = IGNORE
    for div in ("fkl", "tv"):
        live = kd_loss(student, teacher, labels, div)
        assert torch.allclose(topk_kd_loss(student, *_stored(teacher, V), labels, div), live, atol=1e-5)
        approx = topk_kd_loss(student, *_stored(teacher, 20), labels, div)
        assert abs(float(approx - live)) < 0.15 * float(live)


def test_distill_stores_the_logits_training_would_compute(tiny_model_dir, seed_file, tmp_path):
    """The top-k logits kept at generation equal the target's teacher-forced logits on the same ids."""
    from sd2.config import DistillConfig
    from sd2.data import encode_prompt
    from sd2.distill import distill

    out = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "d", limit=3,
                                max_new_tokens=6, batch_size=2, store_topk=5), progress=False)
    ds = datasets.load_from_disk(str(out))
    assert json.loads((out / "sd2_manifest.json").read_text())["store_topk"] == 5
    model, tok = load_model(str(tiny_model_dir))
    for row in ds:
        p = encode_prompt(tok, row["prompt"])
        seq = torch.tensor([p + row["response_ids"]])
        with torch.no_grad():
            logits = model(seq).logits[0, len(p) - 1:]
        n = len(row["topk_ids"])
        assert n in (len(row["response_ids"]), len(row["response_ids"]) + 1)
        vals, idx = logits[:n].topk(5, -1)
        assert idx[:, 0].tolist() == [r[0] for r in row["topk_ids"]]  # greedy: the generated token is the top-1
        assert torch.allclose(vals, torch.tensor(row["topk_logits"]), atol=2e-2)


def test_train_with_draft_vocab_and_stored_teacher(tiny_model_dir, seed_file, tmp_path):
    from sd2.config import DistillConfig, TrainConfig
    from sd2.distill import distill
    from sd2.train import train

    data = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "d", limit=6,
                                 max_new_tokens=12, batch_size=3, store_topk=8), progress=False)
    out = train(TrainConfig(init=str(tiny_model_dir), data=data, out=tmp_path / "m", max_steps=6, batch_size=2,
                            seq_len=64, loss="kd", draft_vocab=48, lr=1e-3, save_steps=3, curve_dir=tmp_path / "curve"),
                progress=False)
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["kd_teacher"] == "stored" and info["draft_vocab"] == 48
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses and all(v == v and v >= 0 for v in losses)
    m, _ = load_model(str(out))
    assert m.get_output_embeddings().weight.shape[0] == 48
    target, tok = load_model(str(tiny_model_dir))
    prompt = tok("the quick brown fox")["input_ids"]
    base = SpecDecoder(target).generate(prompt, 16).tokens
    assert SpecDecoder(target, m, gamma=3).generate(prompt, 16).tokens == base
    for step in (3, 6):  # the learning-curve snapshots load like any drafter, compact head included
        snap, _ = load_model(str(tmp_path / "curve" / f"step-{step}"))
        assert snap.get_output_embeddings().weight.shape[0] == 48
    # resume keeps the stored teacher: a resumed run reads the same data and records the same teacher
    again = train(TrainConfig(init=str(tiny_model_dir), data=data, out=tmp_path / "m", max_steps=6, batch_size=2,
                              seq_len=64, loss="kd", draft_vocab=48, lr=1e-3, save_steps=6, resume=True),
                  progress=False)
    assert json.loads((again / "sd2_train.json").read_text())["kd_teacher"] == "stored"


def test_stored_teacher_of_another_target_is_refused(tiny_model_dir, seed_file, tmp_path):
    from typer.testing import CliRunner

    from sd2.cli import app
    from sd2.config import DistillConfig
    from sd2.distill import distill

    data = distill(DistillConfig(target=str(tiny_model_dir), prompts=str(seed_file), out=tmp_path / "d", limit=2,
                                 max_new_tokens=4, batch_size=2, store_topk=4), progress=False)
    other = tmp_path / "other"
    save_model(make_llama(300, layers=1, seed=9, hidden=64), None, other)
    from tests.conftest import make_tokenizer

    make_tokenizer(300).save_pretrained(other)
    r = CliRunner().invoke(app, ["train", "--init", str(tiny_model_dir), "--data", str(data), "--out",
                                 str(tmp_path / "o"), "--loss", "kd", "--kd-target", str(other)])
    assert r.exit_code == 2 and "come from another model" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("lean", [False, True])
def test_replay_with_a_compact_head_equals_the_engine(lean):
    from sd2 import lean as lean_engine
    from sd2.evaluate import drafter_matches, replay_greedy
    from sd2.specdec import eos_ids

    t = make_llama(96, layers=2, seed=4, eos=None)
    d = perturbed(t, 0.3, seed=14)
    top = sorted(set(SpecDecoder(t).generate(PROMPT, 40).tokens))[:-3]  # most target tokens, not all
    d = draftvocab.compact_head(d, sorted(set(top) | {0, 1}))
    if lean:
        lean_engine.attach(d)
    tokens = SpecDecoder(t).generate(PROMPT, 40).tokens
    matches = drafter_matches(d, PROMPT, tokens)
    assert 0 < sum(matches) < len(matches)
    for gamma in (2, 4):
        eng = SpecDecoder(t, d, gamma=gamma).generate(PROMPT, 40)
        rep = replay_greedy(matches, tokens, gamma, 40, eos_ids(t))
        assert [(s.drafted, s.accepted) for s in rep.steps] == [(s.drafted, s.accepted) for s in eng.steps]


def _prompt_missing_pair(seed: int = 2):
    """A target, a prompt whose greedy answer repeats some of the prompt's tokens, and a near-copy drafter whose
    compact head lacks exactly those tokens (so only the prompt's rows can propose them)."""
    t = make_llama(96, layers=2, seed=seed, eos=None)
    prompt = PROMPT + SpecDecoder(t).generate(PROMPT, 12).tokens
    out = SpecDecoder(t).generate(prompt, 40).tokens
    copied = set(prompt) & set(out)
    assert copied, "the answer must repeat a prompt token for the test to mean something"
    ids = [i for i in range(96) if i not in copied]
    d = draftvocab.compact_head(perturbed(t, 0.05, seed=seed), ids)
    return t, d, prompt, out, ids, copied


@pytest.mark.parametrize("path", ["none", "lean", "lean-fp16"])
def test_prompt_vocab_is_lossless_and_proposes_the_prompts_tokens(path, fresh_kernel):
    from sd2 import lean

    t, d, prompt, out, ids, copied = _prompt_missing_pair()
    if path != "none":
        lean.attach(t, path == "lean-fp16")
        lean.attach(d, path == "lean-fp16")
        out = SpecDecoder(t).generate(prompt, 40).tokens  # target-only on this path
    head = d.get_output_embeddings()
    for gamma in (1, 3, 5):
        plain = SpecDecoder(t, d, gamma=gamma).generate(prompt, 40)
        wide = SpecDecoder(t, d, gamma=gamma, prompt_vocab=True).generate(prompt, 40)
        assert plain.tokens == wide.tokens == out
        assert wide.prompt_rows == len(copied | (set(prompt) - set(ids))) > 0 and plain.prompt_rows == 0
        assert sum(s.accepted for s in wide.steps) > sum(s.accepted for s in plain.steps)
        assert [s.drafted for s in wide.steps] == [min(gamma, 40 - 1 - sum(s.accepted + 1 for s in wide.steps[:i]))
                                                   for i in range(len(wide.steps))]
    # the compact head and its map are back after each prompt
    assert d.get_output_embeddings() is head and draftvocab.draft_ids(d).tolist() == ids


def test_prompt_vocab_keeps_the_sampling_distribution():
    t = make_llama(6, seed=5, eos=None, hidden=16, std=0.6)
    d = draftvocab.compact_head(make_llama(6, seed=6, eos=None, hidden=16, std=0.6), [0, 3, 5])
    assert sampled_tv(t, d, prompt_vocab=True) < 0.06  # the prompt [1, 2, 3] adds rows 1 and 2


@pytest.mark.parametrize("shared", [False, True])
def test_prompt_vocab_in_evaluation_replays_like_the_engine_and_counts_its_macs(shared, tok300):
    """The replay (teacher-forced, or the engine for a shared-KV drafter) widens the head as the engine does, and
    c counts the mean extra rows of the prompts."""
    from sd2.data import Prompt, encode_prompt
    from sd2.evaluate import evaluate_pair
    from sd2.sharedkv import mark

    t = make_llama(300, layers=2, seed=2, eos=None)
    prompts = [Prompt(id=str(i), category="c", text=txt) for i, txt in enumerate(["hello there", "tell me more"])]
    enc = [encode_prompt(tok300, p.text) for p in prompts]
    missing = set().union(*map(set, enc))
    d = draftvocab.compact_head(perturbed(t, 0.05, seed=3), [i for i in range(300) if i not in missing])
    if shared:
        mark(d)
    kw = dict(gamma=3, max_new_tokens=16, progress=False, fast_path="none", replay_gammas=[2, 3])
    plain, _ = evaluate_pair(t, tok300, d, tok300, prompts, **kw)
    wide, _ = evaluate_pair(t, tok300, d, tok300, prompts, prompt_vocab=True, **kw)
    assert wide["prompt_vocab"] and not plain["prompt_vocab"] and wide["lossless"]
    assert wide["prompt_vocab_rows"] == sum(len(set(e)) for e in enc) / 2
    assert wide["drafter_macs_per_token"] - plain["drafter_macs_per_token"] == wide["prompt_vocab_rows"] * 32
    chk = wide["replay"]["engine_check"]
    assert chk["prompts_equal"] == chk["n_prompts"] == 2
