"""Numeric paths of the engine: the lean forward equals the HF module within tolerance; on every path greedy
speculative decoding equals target-only decoding on the same path, and sampling keeps the target's
distribution; a path the models or the machine cannot run is one clear error."""

import copy

import pytest
import torch

from sd2 import lean
from sd2.errors import UserError
from sd2.evaluate import apply_fast_path, numeric_path, resolve_fast_path
from sd2.fastpath import pack_fp16
from sd2.specdec import SpecDecoder
from tests.conftest import make_llama, perturbed
from tests.test_specdec import _exact_two_token_dist, _tv

PATHS = ["none", "lean", "lean-fp16", "drafter-fp16", "fp16", "fp16-lean-drafter"]
PROMPT = [5, 17, 42, 8, 29, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_equals_the_module(dtype):
    m = make_llama(300, layers=3, hidden=64, seed=3).to(dtype)
    s = lean.LeanLM(m).session(capacity=8)  # grows past its capacity below
    ids = list(range(5, 40))
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(s.forward(ids[:12], keep=12), m(torch.tensor([ids[:12]])).logits[0].float(),
                               atol=atol, rtol=0)
    torch.testing.assert_close(s.forward(ids[12:17], keep=5), m(torch.tensor([ids[:17]])).logits[0, 12:].float(),
                               atol=atol, rtol=0)
    s.rollback(14)  # verification rejected the last three: the cache forgets them
    torch.testing.assert_close(s.forward(ids[14:30], keep=16), m(torch.tensor([ids[:30]])).logits[0, 14:].float(),
                               atol=atol, rtol=0)


def test_lean_fp16_close_to_fp32():
    m = make_llama(300, layers=2, hidden=64, seed=4)
    ref = m(torch.tensor([PROMPT])).logits[0].float()
    got = lean.LeanLM(m, fp16_weights=True).session().forward(PROMPT, keep=len(PROMPT))
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


def test_lean_fp16_logits_do_not_depend_on_the_tokens_computed_with_them():
    """The C kernel computes every row in a fixed order: a token decoded alone, verified among γ others, or
    prefilled with the whole prompt gets the same bits — across a cache that grows, on 1 and 2 threads. The same
    forward stays within fp16 rounding of the HF module (fp32)."""
    m = make_llama(300, layers=3, hidden=64, seed=7)
    ids = list(range(5, 45))
    lm = lean.LeanLM(m, fp16_weights=True)
    threads, wholes = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            whole = lm.session(capacity=64).forward(ids, keep=len(ids))
            wholes.append(whole)
            s = lm.session(capacity=8)  # grows twice below
            parts = [s.forward(ids[:10], keep=10)]
            parts += [s.forward([i], keep=1) for i in ids[10:17]]
            parts.append(s.forward(ids[17:22], keep=5))
            s.rollback(19)  # two of five rejected: recomputed among other tokens
            parts.append(s.forward(ids[19:40], keep=21))
            assert torch.equal(torch.cat(parts[:-1])[:19], whole[:19]) and torch.equal(parts[-1], whole[19:])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(wholes[0], wholes[1])  # threads split work, never a sum
    torch.testing.assert_close(whole, m(torch.tensor([ids])).logits[0], atol=2e-2, rtol=2e-2)


def test_lean_fp16_gives_the_same_bits_on_any_x86_64_build(tmp_path):
    """The kernel built for this CPU (AVX-512, or AVX2 + F16C) and for baseline x86-64 (no FMA unit, no vectors
    wider than SSE2) compute every value the same way: the replay cache of target outputs is keyed by kernel version
    only. Only the baseline build reports itself unvectorised (`auto` then prefers fp32 paths)."""
    import platform

    from sd2 import fastpath

    if platform.machine() != "x86_64":
        pytest.skip("the baseline build compared here is x86-64's")
    generic = tmp_path / "generic.so"
    fastpath.build(fastpath.compiler(), generic, ["-march=x86-64" if f.startswith("-march") else f
                                                  for f in fastpath.CFLAGS])
    m = make_llama(300, layers=3, hidden=64, seed=7)
    outs = []
    for dll in (fastpath.kernel(), fastpath.load(generic)):
        lm = lean.LeanLM(m, fp16_weights=True)
        lm.kernel = dll
        s = lm.session(capacity=64)
        outs.append(torch.cat([s.forward(list(range(5, 25)), keep=20), s.forward([3], keep=1)]))
    assert torch.equal(outs[0], outs[1])
    assert fastpath.load(generic).sd2_simd() == 0
    flags = set(fastpath._cpu_flags().split())
    assert fastpath.kernel().sd2_simd() == int("avx512f" in flags or {"avx2", "f16c", "fma"} <= flags)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_spec_equals_target_only_on_every_path(path, gamma):
    t = make_llama(96, seed=2, eos=None, hidden=32)
    d = perturbed(t, 0.5, seed=gamma)
    t, d = apply_fast_path(resolve_fast_path(path, t, d), t, d)
    base = SpecDecoder(t).generate(PROMPT, 40)
    spec = SpecDecoder(t, d, gamma=gamma).generate(PROMPT, 40)
    assert spec.tokens == base.tokens
    assert spec.target_passes < len(spec.tokens)  # some drafts accepted: the check is not trivial


def test_self_draft_on_the_lean_path_accepts_everything():
    t = make_llama(96, seed=2, eos=None, hidden=32)
    t, d = apply_fast_path("lean-fp16", t, t)
    res = SpecDecoder(t, d, gamma=4).generate(PROMPT, 41)
    assert res.mal == pytest.approx(41 / 9)  # 8 full steps of γ+1 = 5 tokens, then the last one


@pytest.mark.parametrize("path", ["lean", "lean-fp16", "fp16-lean-drafter"])
def test_sampling_follows_the_target_distribution_on_the_lean_path(path):
    V, T, N = 6, 1.0, 2000
    t = make_llama(V, seed=5, eos=None, hidden=16, std=0.6)
    d = make_llama(V, seed=6, eos=None, hidden=16, std=0.6)
    # the exact distribution of the path itself: the target's own next-token probabilities on it
    tl = copy.deepcopy(t)
    if path == "fp16-lean-drafter":  # the target on fp16-weight HF modules, the drafter on the engine
        pack_fp16(tl)
    else:
        lean.attach(tl, fp16_weights=path == "lean-fp16")

    def probs(prefix):
        if path == "fp16-lean-drafter":
            return torch.softmax(tl(torch.tensor([prefix])).logits[0, -1].float() / T, -1)
        return torch.softmax(tl.sd2_lean.session().forward(prefix, keep=1)[-1] / T, -1)

    exact = {}
    p1 = probs([1, 2, 3])
    for a in range(V):
        p2 = probs([1, 2, 3, a])
        for b in range(V):
            exact[(a, b)] = float(p1[a] * p2[b])
    drafter_dist = _exact_two_token_dist(d, [1, 2, 3], T)
    apply_fast_path(path, t, d)
    spec = SpecDecoder(t, d, gamma=3, temperature=T)
    emp: dict = {}
    for s in range(N):
        toks = tuple(spec.generate([1, 2, 3], 2, seed=s).tokens)
        emp[toks] = emp.get(toks, 0) + 1
    assert 0.5 * sum(abs(drafter_dist[k] - exact[k]) for k in exact) > 0.2
    assert _tv(emp, exact, N) < 0.07


def test_auto_picks_the_fastest_path_the_models_allow():
    t = make_llama(96, seed=2)
    assert resolve_fast_path("auto", t, t) == "lean-fp16"
    # an asked-for dtype keeps its numbers
    assert resolve_fast_path("auto", copy.deepcopy(t).to(torch.bfloat16), t) == "lean"
    assert numeric_path(t, "lean-fp16") == "fp16 weights, lean engine (sd2 CPU kernel)"
    assert numeric_path(t, "none") == "fp32"


def test_a_path_the_models_cannot_run_is_one_clear_error():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    q = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    t = make_llama(96, seed=2)
    with pytest.raises(UserError, match=r"--fast-path lean: the drafter \(qwen2\).*use --fast-path fp16 or none"):
        resolve_fast_path("lean", t, q)
    assert resolve_fast_path("auto", t, q) == "fp16"  # auto never picks what cannot run
    with pytest.raises(UserError, match=r"--fast-path fp16-lean-drafter: the drafter \(qwen2\)"):
        resolve_fast_path("fp16-lean-drafter", t, q)


def _qwen(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)).eval()


@pytest.mark.parametrize("gamma", [2, 5])
def test_a_target_the_engine_cannot_run_still_gets_a_lean_drafter(gamma):
    """A Gemma-like target (here Qwen2) runs on fp16-weight HF modules; a Llama drafter on the lean engine is
    several times cheaper than on HF modules, and the target's numbers, so lossless, are the fp16 path's."""
    t, d = _qwen(1), make_llama(96, seed=3, eos=None, hidden=32)
    assert resolve_fast_path("auto", t, d) == "fp16-lean-drafter"
    assert resolve_fast_path("auto", t, t) == "fp16"  # the self-draft is the target: no engine for either
    ref = SpecDecoder(apply_fast_path("fp16", copy.deepcopy(t), copy.deepcopy(t))[0]).generate(PROMPT, 30)
    t, d = apply_fast_path("fp16-lean-drafter", t, d)
    assert getattr(t, "sd2_lean", None) is None and d.sd2_lean is not None
    assert SpecDecoder(t).generate(PROMPT, 30).tokens == ref.tokens  # the target's numbers are fp16's
    assert SpecDecoder(t, d, gamma=gamma).generate(PROMPT, 30).tokens == ref.tokens
    assert numeric_path(t, "fp16-lean-drafter").startswith("fp16-weight target and drafter")


def test_auto_prefers_fp32_where_the_kernel_cannot_vectorise(fresh_kernel, monkeypatch):
    """A kernel built without vector fp16 conversion (baseline x86-64 here) loses to fp32 GEMMs: `auto` takes the
    lean fp32 path then (an explicit --fast-path lean-fp16 still runs it, with the same bits)."""
    import platform

    from sd2 import fastpath

    if platform.machine() != "x86_64":
        pytest.skip("the baseline build compared here is x86-64's")
    monkeypatch.setattr(fastpath, "CFLAGS", ["-march=x86-64" if f.startswith("-march") else f
                                             for f in fastpath.CFLAGS])
    t = make_llama(96, seed=2)
    assert not fastpath.vectorized() and resolve_fast_path("auto", t, t) == "lean"
    assert resolve_fast_path("lean-fp16", t, t) == "lean-fp16"


@pytest.mark.parametrize("cc, message", [
    ("/nonexistent/cc", r"needs a C compiler \(CC=/nonexistent/cc not found\).*use --fast-path lean \(fp32\) or none"),
    ("false", r"false could not build sd2's fp16 kernel.*use --fast-path lean \(fp32\) or none"),
])
def test_no_compiler_is_one_clear_error_and_auto_picks_what_runs(fresh_kernel, monkeypatch, cc, message):
    monkeypatch.setenv("CC", cc)
    t = make_llama(96, seed=2)
    assert resolve_fast_path("auto", t, t) == "lean"  # auto never picks what cannot run
    for path in ("fp16", "lean-fp16"):
        with pytest.raises(UserError, match=message):
            apply_fast_path(path, t, copy.deepcopy(t))
    assert not any(fresh_kernel.glob("*.so")) and not any(fresh_kernel.glob("*/"))  # nothing half-built left


def test_the_kernel_is_built_once_and_reused(fresh_kernel):
    from sd2 import fastpath

    fastpath.kernel()
    built = list(fresh_kernel.glob("cpu-*.so"))
    assert len(built) == 1 and not [p for p in fresh_kernel.iterdir() if p.is_dir()]
    stamp = built[0].stat().st_mtime_ns
    fastpath.kernel.cache_clear()
    fastpath.kernel()
    assert built[0].stat().st_mtime_ns == stamp


def test_distillation_on_the_fp16_path(tmp_path, tiny_model_dir, seed_file):
    """Batched generation with fp16-packed GEMMs: a dataset like any other, its path in the manifest, and a
    resume with another path refused (other numbers, other answers)."""
    import json

    from sd2.config import DistillConfig
    from sd2.distill import distill

    common = dict(target=str(tiny_model_dir), prompts=str(seed_file), max_new_tokens=8, batch_size=4, device="cpu")
    out = distill(DistillConfig(out=tmp_path / "d16", fast_path="fp16", **common), progress=False)
    man = json.loads((out / "sd2_manifest.json").read_text())
    assert man["fast_path"] == "fp16" and man["counts"]["kept"] > 0
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "run.json").write_text(json.dumps({**{k: man[k] for k in man if k in (
        "target", "prompts")}, "fast_path": "fp16"}))
    with pytest.raises(UserError, match="other arguments"):
        distill(DistillConfig(out=tmp_path / "x", **common), progress=False)


@pytest.mark.parametrize("path, distill", [("auto", "fp16"), ("fp16-lean-drafter", "fp16"), ("lean", "none"),
                                           ("none", "none")])
def test_distillation_generates_on_the_evaluation_paths_target_numbers(path, distill):
    """A pipeline whose evaluation runs the target with fp16 weights distils with them too (CPU)."""
    from sd2.config import PipelineConfig

    assert PipelineConfig(fast_path=path).resolved().distill_settings().fast_path == distill
