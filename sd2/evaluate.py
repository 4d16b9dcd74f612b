"""Run prompts through target-only and speculative decoding in one process → per-prompt records →
the summary of the `sd2 eval` JSON (overall and per category)."""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from sd2 import metrics
from sd2.config import FP16_TARGET_PATHS, EvalConfig
from sd2.data import Prompt, encode_prompt, load_prompts
from sd2.draftvocab import draft_ids, head_source, missing_ids, prompt_rows
from sd2.eagle import feature_layers, is_feature_drafter
from sd2.sharedkv import shares_kv
from sd2.errors import UserError
from sd2.device import synchronize, torch_threads  # noqa: F401 - torch_threads re-exported for older imports
from sd2.fastpath import PACKED, pack_fp16, require_cpu
from sd2.io import atomic_write_text, write_json  # noqa: F401 - re-exported for older imports
from sd2.models import load_model, model_digest, resolve_spec, same_tokenizer, sd2_home
from sd2.progress import bar as progress_bar
from sd2.specdec import DecodeResult, SpecDecoder, Step, _LookupProposer, eos_ids


def _cost_ratio(target_macs: float, drafter_macs: float, drafter_per_target_token: float = 1.0) -> float:
    return drafter_macs * drafter_per_target_token / target_macs


def _check_request(prompts: list[Prompt], cross: bool, uag: bool, replay_gammas, temperature: float,
                   draft_threshold: float | None, shared_kv: str, drafter) -> None:
    """Refuse an evaluation that cannot run as asked, before either model is touched."""
    if not prompts:
        raise UserError("no prompts to evaluate")
    if cross and not uag:
        raise UserError("--drafter: its tokenizer differs from the target's; pass --uag for cross-tokenizer drafting")
    if replay_gammas and (cross or temperature > 0):
        raise UserError("--replay-gammas: replay is exact only for greedy decoding with a same-tokenizer drafter; "
                        "drop it (or evaluate each γ with the engine)")
    if replay_gammas and draft_threshold is not None:
        raise UserError("--replay-gammas: replay models fixed-length drafting; drop --draft-threshold or the replay")
    if shared_kv == "on" and (cross or is_feature_drafter(drafter)):
        raise UserError("--shared-kv on: a drafter reads the target's KV cache when it is a pruned copy of the target "
                        "(same tokenizer and layers), not a UAG or feature drafter; use --shared-kv auto or off")


def evaluate_pair(target, target_tok, drafter, drafter_tok, prompts: list[Prompt], *, gamma: int = 4,
                  max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, uag: bool = False,
                  context: int = 256, progress: bool = True, names: tuple[str, str] = ("target", "drafter"),
                  fast_path: str = "auto", replay_gammas: list[int] | None = None,
                  replay_prompts: list[Prompt] | None = None, replay_cache: Path | None = None,
                  draft_threshold: float | None = None, lookup: int = 0, shared_kv: str = "auto",
                  prompt_vocab: bool = False) -> tuple[dict, pd.DataFrame]:
    """Decode every prompt target-only and speculatively (alternating which goes first); return (summary, records).

    `fast_path` prepares both models for a numeric path in place (resolve_fast_path); MACs are counted before.
    `replay_gammas` adds greedy MAL at other γ by exact replay (see `replay_greedy`) over `replay_prompts`
    (default: the same prompts), checked against the engine at `gamma` on the prompts both ran. `lookup` puts
    prompt lookup in front of the drafter (SpecDecoder); `shared_kv` (auto | on | off) lets the drafter read the
    target's KV cache (sd2.sharedkv; auto: when the drafter was trained so); `prompt_vocab` widens a compact draft
    head by each prompt's own tokens (sd2.draftvocab.prompt_rows; their MACs are counted in c).
    """
    cross = not same_tokenizer(target_tok, drafter_tok)
    _check_request(prompts, cross, uag, replay_gammas, temperature, draft_threshold, shared_kv, drafter)
    tmacs = metrics.macs_per_token(target, context)["macs_per_token"]
    dmacs = metrics.macs_per_token(drafter, context)["macs_per_token"]
    prompt_vocab = prompt_vocab and not cross and draft_ids(drafter) is not None
    encoded = [(encode_prompt(target_tok, p.text), encode_prompt(drafter_tok, p.text) if cross else None)
               for p in prompts]
    rows = 0.0
    if prompt_vocab:  # the rows a prompt adds to the head are MACs of every drafted token: counted in c
        every = [e[0] for e in encoded] + [encode_prompt(target_tok, p.text) for p in replay_prompts or []]
        rows = statistics.mean(len(missing_ids(drafter, ids)) for ids in every)
        dmacs += rows * head_source(target).shape[1]
    fast_path = resolve_fast_path(fast_path, target, drafter)
    weight_bytes = _weight_bytes(target, drafter, fast_path, rows)  # counted before the path packs the weights
    target, drafter = apply_fast_path(fast_path, target, drafter)
    share = shared_kv == "on" or (shared_kv == "auto" and shares_kv(drafter) and not cross)
    spec = SpecDecoder(target, drafter, gamma=gamma, temperature=temperature, target_tokenizer=target_tok,
                       drafter_tokenizer=drafter_tok, cross_tokenizer=cross, draft_threshold=draft_threshold,
                       lookup=lookup, shared_kv=share, prompt_vocab=prompt_vocab)
    base = SpecDecoder(target, None, temperature=temperature, target_tokenizer=target_tok)
    df, base_res, spec_res = _decode_all(base, spec, prompts, encoded, max_new_tokens, gamma, seed, temperature,
                                         cross, target_tok, drafter_tok, progress)
    per_tok = (df["drafter_tokens"].sum() / max(df["spec_tokens"].sum(), 1)) if cross else 1.0
    c = _cost_ratio(tmacs, dmacs, per_tok)
    summary = _summarize(base_res, spec_res, df, gamma)
    costs = measure_costs(target, drafter, encoded[0][1] if cross else encoded[0][0], encoded[0][0], gamma)
    out = {
        "target": names[0], "drafter": names[1], "gamma": gamma, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "n_prompts": len(prompts),
        "mal": summary["mal"], "mal_ci95": metrics.bootstrap_ci(spec_res, seed=seed),
        "acceptance_rate": summary["acceptance_rate"],
        "per_position_acceptance": metrics.per_position_acceptance(spec_res, gamma),
        "target_tokens_per_s": summary["target_tokens_per_s"], "spec_tokens_per_s": summary["spec_tokens_per_s"],
        "speedup": summary["speedup"], "target_macs_per_token": tmacs, "drafter_macs_per_token": dmacs,
        "cost_ratio": c, "theoretical_speedup": metrics.theoretical_speedup(summary["mal"], gamma, c),
        **weight_bytes,
        **costs, "predicted_speedup": metrics.predicted_speedup(summary["mal"], gamma, costs["drafter_time_ratio"],
                                                                costs["verify_cost_ratio"]),
        "lossless": bool(df["lossless"].all()) if temperature == 0 else None,
        "per_category": {},
        "numeric_path": numeric_path(target, fast_path), "shared_kv": share, "prompt_vocab": prompt_vocab,
    }
    if prompt_vocab:
        out["prompt_vocab_rows"] = rows
    if draft_threshold is not None:  # dynamic draft length: how many drafts a step made on average
        out["draft_threshold"] = draft_threshold
        out["mean_drafted"] = float(df["drafted"].sum() / max(df["target_passes"].sum(), 1))
    if lookup:  # prompt lookup: the share of steps whose drafts were copied from the context
        out["lookup"] = lookup
        out["lookup_step_share"] = sum(r.looked_up for r in spec_res) / max(sum(len(r.steps) for r in spec_res), 1)
    for cat, sub in df.groupby("category", sort=True):
        idx = list(sub.index)
        s = _summarize([base_res[i] for i in idx], [spec_res[i] for i in idx], sub, gamma)
        out["per_category"][str(cat)] = {"n_prompts": len(idx), "mal": s["mal"],
                                         "acceptance_rate": s["acceptance_rate"], "speedup": s["speedup"]}
    if replay_gammas:
        known = {p.id: b.tokens for p, b in zip(prompts, base_res)}
        out["replay"] = replay_eval(target, target_tok, drafter, replay_prompts or prompts, replay_gammas,
                                    max_new_tokens, c, known=known, engine={p.id: s for p, s in zip(prompts, spec_res)},
                                    engine_gamma=gamma, seed=seed, progress=progress,
                                    cache_dir=_replay_cache_dir(replay_cache, fast_path), lookup=lookup,
                                    shared_kv=share, prompt_vocab=prompt_vocab)
    return out, df


@torch.inference_mode()
def drafter_matches(drafter, prompt: list[int], tokens: list[int]) -> list[bool]:
    """matches[j]: the drafter's greedy prediction after prompt + tokens[:j] is tokens[j] (one teacher-forced pass)."""
    if not tokens:
        return []
    if getattr(drafter, "sd2_lean", None) is not None:  # the engine's own numeric path
        logits = drafter.sd2_lean.session(len(prompt) + len(tokens)).forward(prompt + tokens[:-1], keep=len(tokens))
        pred = logits.argmax(-1).tolist()
    else:
        inp = torch.tensor([prompt + tokens[:-1]], dtype=torch.long, device=drafter.device)
        pred = drafter(input_ids=inp, logits_to_keep=len(tokens)).logits[0].argmax(-1).tolist()
    dmap = draft_ids(drafter)
    if dmap is not None:  # compact head: its index → the token id
        pred = dmap[pred].tolist()
    return [p == t for p, t in zip(pred, tokens)]


def replay_greedy(matches: list[bool], tokens: list[int], gamma: int, max_new_tokens: int,
                  eos: set[int], prompt: list[int] | None = None, lookup: int = 0) -> DecodeResult:
    """Greedy speculative decoding replayed from the target's greedy output and the drafter's teacher-forced
    matches, step for step as SpecDecoder runs it: while drafts match they *are* the target's tokens, so the
    drafter's prediction there is its teacher-forced one, and a step accepts the run of matches (capped by γ).
    Exact for MAL, accepted counts and per-position acceptance; `drafted` assumes the drafter does not emit an
    end-of-sequence token right after a rejected draft (then the engine drafts fewer). With `lookup`, a step
    whose context suffix occurred before in `prompt` + tokens drafts the copy instead (as _LookupProposer)."""
    res = DecodeResult(tokens=list(tokens))
    n_tok, pos = len(tokens), 0
    copier = _LookupProposer(None, lookup, eos) if lookup else None  # the engine's, with no drafter behind it
    while pos < n_tok:
        n = min(gamma, max_new_tokens - pos - 1)
        copy = copier.propose(list(prompt or []) + tokens[:pos], n)[0] if copier is not None and n > 0 else []
        a = 0
        if copy:
            while a < len(copy) and pos + a < n_tok and copy[a] == tokens[pos + a]:
                a += 1
            drafted = len(copy)
        else:
            while a < n and pos + a < n_tok and matches[pos + a]:
                a += 1
                if tokens[pos + a - 1] in eos:  # the drafter stops drafting after an end token
                    break
            drafted = a if (a and tokens[pos + a - 1] in eos) else max(n, 0)
        accepted = min(a, n_tok - 1 - pos)
        res.steps.append(Step(drafted=drafted, accepted=accepted))
        res.target_passes += 1
        pos += accepted + 1
    res.looked_up = copier.looked_up if copier is not None else 0
    return res


def _replayer(target, drafter, prompt: list[int], tokens: list[int], max_new_tokens: int, eos: set[int],
              lookup: int = 0, shared_kv: bool = False, target_tok=None, prompt_vocab: bool = False):
    """γ ↦ the replayed DecodeResult of one prompt: from teacher-forced matches (token drafters), by running a
    feature drafter on the target's teacher-forced features, or (a drafter over the target's KV cache, whose
    drafts depend on where each step starts) by the engine itself, checked against the target's output."""
    def rows():  # the drafter's head widened by this prompt's tokens (prompt_vocab)
        return prompt_rows(drafter, head_source(target), prompt) if prompt_vocab else nullcontext(0)

    if shared_kv:
        def run(g: int) -> DecodeResult:
            res = SpecDecoder(target, drafter, gamma=g, target_tokenizer=target_tok, lookup=lookup,
                              shared_kv=True, prompt_vocab=prompt_vocab).generate(prompt, max_new_tokens)
            if res.tokens != tokens:
                raise RuntimeError(f"shared-KV decoding at γ={g} gave other tokens than the target alone")
            return res
        return run
    if not is_feature_drafter(drafter):
        with rows():
            matches = drafter_matches(drafter, prompt, tokens)
        return lambda g: replay_greedy(matches, tokens, g, max_new_tokens, eos, prompt, lookup)
    from sd2.specdec import cached

    feats = cached(target, len(prompt) + len(tokens)).forward(
        prompt + tokens[:-1], keep=1, hidden=feature_layers(drafter.config))[1] if tokens else None

    def features(g: int) -> DecodeResult:
        with rows():
            return replay_features(drafter, feats, prompt, tokens, g, max_new_tokens, eos, lookup)
    return features


def replay_features(drafter, feats: torch.Tensor, prompt: list[int], tokens: list[int], gamma: int,
                    max_new_tokens: int, eos: set[int], lookup: int = 0) -> DecodeResult:
    """Greedy speculative decoding with a feature drafter replayed from the target's greedy output `tokens` and its
    features over prompt + tokens[:-1]: the drafter runs as in SpecDecoder (same proposer), the target's
    verification is read off `tokens`. Exact up to the rounding of one teacher-forced target pass against the
    engine's incremental ones (the engine check in replay_eval compares them)."""
    from sd2.specdec import _FeatureProposer

    res = DecodeResult(tokens=list(tokens))
    if not tokens:
        return res
    prop = _FeatureProposer(drafter, eos, 0.0, None, capacity=len(prompt) + len(tokens) + gamma + 2)
    prop = _LookupProposer(prop, lookup, eos) if lookup else prop
    ids, pos, n_tok = list(prompt), 0, len(tokens)
    with torch.inference_mode():
        while pos < n_tok:
            n = min(gamma, max_new_tokens - pos - 1)
            drafts = prop.propose(ids, n)[0] if n > 0 else []  # none from the drafter before the target ran
            a = 0
            while a < len(drafts) and pos + a < n_tok and drafts[a] == tokens[pos + a]:
                a += 1
            accepted = min(a, n_tok - 1 - pos)
            res.steps.append(Step(drafted=len(drafts), accepted=accepted))
            res.target_passes += 1
            # the target kept len(ids) - 1 positions before this step (none before the first)
            prop.observe(feats[len(ids) - 1 if pos else 0: len(ids) + accepted])
            ids += tokens[pos: pos + accepted + 1]
            pos += accepted + 1
    res.looked_up = getattr(prop, "looked_up", 0)
    return res


def greedy_output(base: SpecDecoder, ids: list[int], max_new_tokens: int, cache_dir: Path | None) -> list[int]:
    """The target's greedy output for a prompt (`base`: target-only decoding). It does not depend on the drafter, so
    it is computed once per target, numeric path and prompt and kept in `cache_dir`."""
    f = cache_dir / (hashlib.sha256(json.dumps([ids, max_new_tokens]).encode()).hexdigest()[:24] + ".json") \
        if cache_dir else None
    if f is not None and f.exists():
        return json.loads(f.read_text())
    tokens = base.generate(ids, max_new_tokens).tokens
    if f is not None:
        write_json(tokens, f)
    return tokens


def replay_eval(target, target_tok, drafter, prompts: list[Prompt], gammas: list[int], max_new_tokens: int,
                cost_ratio: float, *, known: dict | None = None, engine: dict | None = None, engine_gamma: int = 4,
                seed: int = 0, progress: bool = True, cache_dir: Path | None = None, lookup: int = 0,
                shared_kv: bool = False, prompt_vocab: bool = False) -> dict:
    """Greedy MAL, acceptance and theoretical speedup at each γ from one target decode and one drafter pass per
    prompt; `known` target outputs are reused (and others kept in `cache_dir`), and prompts also run by the
    engine (`engine`) cross-check the replay against it."""
    known = known or {}
    base = SpecDecoder(target, None, target_tokenizer=target_tok)
    eos = eos_ids(target, target_tok)
    per_prompt = []
    for p in progress_bar(prompts, progress=progress, desc="replay", unit="prompt"):
        ids = encode_prompt(target_tok, p.text)
        tokens = known[p.id] if p.id in known else greedy_output(base, ids, max_new_tokens, cache_dir)
        per_prompt.append((p, tokens, _replayer(target, drafter, ids, tokens, max_new_tokens, eos, lookup,
                                                shared_kv, target_tok, prompt_vocab)))
    out = {"method": ("greedy, the engine run at each γ (a drafter over the target's KV cache)" if shared_kv else
                      "greedy replay: the target's greedy output and features (one teacher-forced target pass), the "
                      "drafter run step by step" if is_feature_drafter(drafter) else
                      "exact greedy replay: target's greedy output + one teacher-forced drafter pass per prompt"),
           "n_prompts": len(prompts), "gammas": {}}
    for g in gammas:
        results = [sim(g) for _, _, sim in progress_bar(per_prompt, progress=progress, desc=f"engine at γ={g}",
                                                         unit="prompt", disable=not shared_kv)]
        mal_g = metrics.mal(results)
        cats: dict[str, list[DecodeResult]] = {}
        for (p, _, _), r in zip(per_prompt, results):
            cats.setdefault(str(p.category), []).append(r)
        out["gammas"][str(g)] = {
            "mal": mal_g, "mal_ci95": metrics.bootstrap_ci(results, seed=seed),
            "acceptance_rate": metrics.acceptance_rate(results),
            "per_position_acceptance": metrics.per_position_acceptance(results, g),
            "theoretical_speedup": metrics.theoretical_speedup(mal_g, g, cost_ratio),
            "per_category": {c: metrics.mal(rs) for c, rs in sorted(cats.items())}}
    if engine:
        pairs = [(engine[p.id], sim(engine_gamma)) for p, _, sim in per_prompt if p.id in engine]
        if pairs:
            out["engine_check"] = {
                "gamma": engine_gamma, "n_prompts": len(pairs),
                "mal_engine": metrics.mal([e for e, _ in pairs]), "mal_replay": metrics.mal([r for _, r in pairs]),
                "prompts_equal": sum([s.accepted for s in e.steps] == [s.accepted for s in r.steps] for e, r in pairs)}
    return out


def _replay_cache_dir(root: Path | None, fast_path: str) -> Path | None:
    """Target greedy outputs are cached per numeric path of the target (they differ between paths)."""
    if root is None:
        return None
    name = {"none": "hf", "drafter-fp16": "hf", "fp16": "fp16", "fp16-lean-drafter": "fp16", "lean": "lean",
            "lean-fp16": "lean-fp16"}[fast_path]  # the target's numbers only: fp16-lean-drafter's are fp16's
    if name in ("fp16", "lean-fp16"):  # the kernel's code decides the numbers: a new kernel, a new cache
        from sd2.fastpath import kernel_version

        name += f"-{kernel_version()}"
    return root / name


def resolve_fast_path(fast_path: str, target, drafter) -> str:
    """`auto` → the fastest path this machine and these models allow: on the CPU the lean engine with fp16
    weights in sd2's C kernel (bench/specdec.py has the measurements), on a GPU the HF modules in the model dtype."""
    from sd2 import fastpath, lean

    on_cpu = next(target.parameters()).device.type == "cpu"
    if fast_path == "auto":
        if not on_cpu:
            return "none"
        both_lean = lean.supports(target) and lean.supports(drafter)
        if next(target.parameters()).dtype != torch.float32:  # a dtype the user asked for: keep its numbers
            return "lean" if both_lean else "none"
        if not fastpath.vectorized():
            return "lean" if both_lean else "none"
        if both_lean:
            return "lean-fp16"
        # a target only the HF modules run (Gemma): its drafter may still be a Llama the engine runs much faster
        return "fp16-lean-drafter" if drafter is not target and lean.supports(drafter) else "fp16"
    fastpath.require_cpu(fast_path, next(target.parameters()).device)
    roles = {"lean": ("target", "drafter"), "lean-fp16": ("target", "drafter"),
             "fp16-lean-drafter": ("drafter",)}.get(fast_path, ())
    for role, m in (("target", target), ("drafter", drafter)):
        if role in roles and not lean.supports(m):
            raise UserError(f"--fast-path {fast_path}: the {role} ({m.config.model_type}) is not a Llama-family "
                            "model the lean engine runs; use --fast-path fp16 or none")
    return fast_path


def apply_fast_path(fast_path: str, target, drafter):
    """Prepare both models for the path, in place (a drafter that *is* the target is copied first when only the
    drafter changes). Count MACs before this."""
    from sd2 import lean

    if fast_path == "none":
        return target, drafter
    if fast_path == "drafter-fp16":
        return target, pack_fp16(copy.deepcopy(drafter) if drafter is target else drafter)
    if fast_path == "fp16":
        pack_fp16(target)
        return target, (drafter if drafter is target else pack_fp16(drafter))
    if fast_path == "fp16-lean-drafter":  # the target on HF modules, the drafter on the engine: both fp16 weights
        pack_fp16(target)
        if drafter is not target:  # the self-draft is the target, on the target's own path
            lean.attach(drafter, True)
        return target, drafter
    fp16 = fast_path == "lean-fp16"
    lean.attach(target, fp16)
    if drafter is not target:
        lean.attach(drafter, fp16)
    return target, drafter


def _weight_bytes(target, drafter, fast_path: str, head_rows: float) -> dict[str, float]:
    """Weight bytes per token of each model on the numeric path (fp16 where the path packs fp16 weights), and the
    drafter's over the target's: what a memory-bound forward costs, beside its MACs (metrics.weight_bytes_per_token)."""
    def elem(model, fp16: bool) -> int:
        return 2 if fp16 else next(model.parameters()).element_size()

    t = metrics.weight_bytes_per_token(target, elem(target, fast_path in FP16_TARGET_PATHS))
    d = metrics.weight_bytes_per_token(drafter, elem(drafter, fast_path in PACKED),
                                       head_rows)
    return {"target_weight_bytes_per_token": t["dense"], "drafter_weight_bytes_per_token": d["dense"],
            "drafter_nonzero_bytes_per_token": d["nonzero"], "weight_bytes_ratio": d["dense"] / t["dense"]}


def numeric_path(model, fast_path: str = "none") -> str:
    """How the target's numbers are computed: dtype, device, packing and engine (lossless is judged within one)."""
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    base = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if p is not None and p.device.type != "cpu":
        base += f" on {p.device}"
    return {"none": base, "drafter-fp16": f"{base} target, fp16-weight drafter",
            "fp16": "fp16-weight target and drafter", "lean": f"{base}, lean engine",
            "fp16-lean-drafter": "fp16-weight target and drafter, drafter on the lean engine (sd2 CPU kernel)",
            "lean-fp16": "fp16 weights, lean engine (sd2 CPU kernel)"}[fast_path]


def _decode_all(base: SpecDecoder, spec: SpecDecoder, prompts: list[Prompt], encoded, max_new_tokens: int,
                gamma: int, seed: int, temperature: float, cross: bool, target_tok, drafter_tok, progress: bool):
    """Each prompt target-only and speculatively, alternating which runs first; (records, base, spec results)."""
    # Warm-up (first-call allocations, lazy inits) so neither side pays it inside the timing.
    base.generate(encoded[0][0], 2, seed=seed)
    spec.generate(encoded[0][0], min(gamma + 2, 8), seed=seed, drafter_prompt=encoded[0][1])
    rows, base_res, spec_res = [], [], []
    for i, (p, (ids, dids)) in enumerate(progress_bar(list(zip(prompts, encoded)), progress=progress,
                                                      desc="eval (timed)", unit="prompt")):
        runs = {}
        for which in (("base", "spec") if i % 2 == 0 else ("spec", "base")):
            runs[which] = (base.generate(ids, max_new_tokens, seed=seed + i) if which == "base" else
                           spec.generate(ids, max_new_tokens, seed=seed + i, drafter_prompt=dids))
        b, s = runs["base"], runs["spec"]
        base_res.append(b)
        spec_res.append(s)
        row = {
            "id": p.id, "category": p.category, "prompt_tokens": len(ids),
            "target_tokens": len(b.tokens), "target_seconds": b.seconds,
            "spec_tokens": len(s.tokens), "spec_seconds": s.seconds, "target_passes": s.target_passes,
            "mal": s.mal, "drafted": sum(x.drafted for x in s.steps), "accepted": sum(x.accepted for x in s.steps),
            "lossless": (b.tokens == s.tokens) if temperature == 0 else None,
        }
        if cross:
            text = target_tok.decode(s.tokens, skip_special_tokens=True)
            row["drafter_tokens"] = len(drafter_tok.encode(text, add_special_tokens=False))
        rows.append(row)
    return pd.DataFrame(rows), base_res, spec_res


@torch.inference_mode()
def measure_costs(target, drafter, drafter_prompt: list[int], prompt: list[int], gamma: int,
                  repeats: int = 7) -> dict:
    """The cost model of this run, timed in-process with KV caches (medians, the kinds alternating):
    verify_cost_ratio v = a target forward over γ+1 new tokens ÷ a one-token target forward;
    drafter_time_ratio = a one-token drafter forward ÷ a one-token target forward.
    With MAL they predict the speedup: MAL ÷ (γ·drafter_time_ratio + v) (metrics.predicted_speedup)."""
    from sd2.specdec import cached

    tc, dc = cached(target), cached(drafter)
    ctx = list(prompt[-64:]) or [0]
    dctx = list(drafter_prompt[-64:]) or [0]
    tc.forward(ctx, keep=1)
    dc.forward(dctx, keep=1)
    times: dict[str, list[float]] = {"t1": [], "tk": [], "d1": []}

    def timed(cache, ids, n_new, key):  # new tokens from the model's own context (vocabularies may differ: UAG)
        synchronize(cache.model.device)
        t0 = time.perf_counter()
        cache.forward(ids + [ids[-1]] * n_new, keep=n_new)
        synchronize(cache.model.device)
        times[key].append(time.perf_counter() - t0)
        cache.rollback(len(ids))

    order = [("t1", tc, ctx, 1), ("tk", tc, ctx, gamma + 1), ("d1", dc, dctx, 1)]
    for r in range(2 + repeats):  # two warm-up rounds, then the measured ones
        if r == 2:
            times = {k: [] for k in times}
        for key, cache, ids, n in (order if r % 2 == 0 else order[::-1]):
            timed(cache, ids, n, key)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"verify_cost_ratio": med["tk"] / med["t1"], "drafter_time_ratio": med["d1"] / med["t1"],
            "target_forward_ms": med["t1"] * 1e3}


def _summarize(base_res: list[DecodeResult], spec_res: list[DecodeResult], df: pd.DataFrame, gamma: int) -> dict:
    t_tps = df["target_tokens"].sum() / df["target_seconds"].sum()
    s_tps = df["spec_tokens"].sum() / df["spec_seconds"].sum()
    return {"mal": metrics.mal(spec_res), "acceptance_rate": metrics.acceptance_rate(spec_res),
            "target_tokens_per_s": float(t_tps), "spec_tokens_per_s": float(s_tps), "speedup": float(s_tps / t_tps)}


def run_eval(cfg: EvalConfig, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """`sd2 eval`: load both models and the prompts, then evaluate_pair with threads pinned."""
    from sd2 import device as devices

    opts = cfg.load
    where = devices.resolve(cfg.device, cfg.dtype, lambda: resolve_spec(cfg.target, opts.allow_pickle))
    prompts = load_prompts(cfg.prompts, cfg.categories, cfg.limit)
    require_cpu(cfg.fast_path, where.device)  # before loading anything
    target, ttok = load_model(cfg.target, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code,
                              placement=where)
    # the drafter sits beside the target's first layers (a spread target keeps its embedding there)
    drafter, dtok = load_model(cfg.drafter, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code,
                               placement=devices.Placement(where.device, where.dtype))
    with torch_threads(cfg.threads):
        return evaluate_pair(target, ttok, drafter, dtok, prompts, gamma=cfg.gamma,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                             uag=cfg.uag, context=cfg.context, progress=progress,
                             names=(cfg.target, cfg.drafter), fast_path=cfg.fast_path,
                             replay_gammas=cfg.replay_gammas, draft_threshold=cfg.draft_threshold, lookup=cfg.lookup,
                             shared_kv=cfg.shared_kv, prompt_vocab=cfg.prompt_vocab,
                             replay_prompts=(load_prompts(cfg.prompts, cfg.categories, cfg.replay_limit)
                                             if cfg.replay_gammas and cfg.replay_limit else None),
                             replay_cache=(sd2_home() / "cache" / "target-greedy" / model_digest(cfg.target)[:20]
                                           if cfg.replay_gammas else None))
