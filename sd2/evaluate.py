"""Run prompts through target-only and speculative decoding in one process → per-prompt records →
the summary of DESIGN §2 (overall and per category)."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from sd2 import metrics
from sd2.config import EvalConfig
from sd2.data import Prompt, encode_prompt, load_prompts
from sd2.errors import UserError
from sd2.fastpath import pack_fp16
from sd2.models import load_model, same_tokenizer
from sd2.specdec import DecodeResult, SpecDecoder


@contextmanager
def torch_threads(n: int | None):
    """Pin torch's intra-op threads for a measurement, restoring them afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cost_ratio(target_macs: float, drafter_macs: float, drafter_per_target_token: float = 1.0) -> float:
    return drafter_macs * drafter_per_target_token / target_macs


def evaluate_pair(target, target_tok, drafter, drafter_tok, prompts: list[Prompt], *, gamma: int = 4,
                  max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, uag: bool = False,
                  context: int = 256, progress: bool = True, names: tuple[str, str] = ("target", "drafter"),
                  fast_path: str = "none") -> tuple[dict, pd.DataFrame]:
    """Decode every prompt target-only and speculatively (alternating which goes first); return (summary, records).

    `fast_path` packs linear layers in place (see sd2.fastpath); MACs are counted before that.
    """
    if not prompts:
        raise UserError("no prompts to evaluate")
    cross = not same_tokenizer(target_tok, drafter_tok)
    if cross and not uag:
        raise UserError("--drafter: its tokenizer differs from the target's; pass --uag for cross-tokenizer drafting")
    tmacs = metrics.macs_per_token(target, context)["macs_per_token"]
    dmacs = metrics.macs_per_token(drafter, context)["macs_per_token"]
    if fast_path != "none":
        if drafter is target:
            drafter = copy.deepcopy(drafter)
        pack_fp16(drafter)
        if fast_path == "fp16":
            pack_fp16(target)
    spec = SpecDecoder(target, drafter, gamma=gamma, temperature=temperature, target_tokenizer=target_tok,
                       drafter_tokenizer=drafter_tok, cross_tokenizer=cross)
    base = SpecDecoder(target, None, temperature=temperature, target_tokenizer=target_tok)
    encoded = [(encode_prompt(target_tok, p.text), encode_prompt(drafter_tok, p.text) if cross else None)
               for p in prompts]
    # Warm-up (first-call allocations, lazy inits) so neither side pays it inside the timing.
    base.generate(encoded[0][0], 2, seed=seed)
    spec.generate(encoded[0][0], min(gamma + 2, 8), seed=seed, drafter_prompt=encoded[0][1])

    rows, base_res, spec_res = [], [], []
    for i, (p, (ids, dids)) in enumerate(tqdm(list(zip(prompts, encoded)), desc="eval", unit="prompt",
                                              disable=not progress)):
        runs = {}
        order = ("base", "spec") if i % 2 == 0 else ("spec", "base")
        for which in order:
            if which == "base":
                runs[which] = base.generate(ids, max_new_tokens, seed=seed + i)
            else:
                runs[which] = spec.generate(ids, max_new_tokens, seed=seed + i, drafter_prompt=dids)
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
    df = pd.DataFrame(rows)

    per_tok = (df["drafter_tokens"].sum() / max(df["spec_tokens"].sum(), 1)) if cross else 1.0
    c = _cost_ratio(tmacs, dmacs, per_tok)
    summary = _summarize(base_res, spec_res, df, gamma)
    out = {
        "target": names[0], "drafter": names[1], "gamma": gamma, "temperature": temperature,
        "max_new_tokens": max_new_tokens, "n_prompts": len(prompts),
        "mal": summary["mal"], "mal_ci95": metrics.bootstrap_ci(spec_res, seed=seed),
        "acceptance_rate": summary["acceptance_rate"],
        "per_position_acceptance": metrics.per_position_acceptance(spec_res, gamma),
        "target_tokens_per_s": summary["target_tokens_per_s"], "spec_tokens_per_s": summary["spec_tokens_per_s"],
        "speedup": summary["speedup"], "target_macs_per_token": tmacs, "drafter_macs_per_token": dmacs,
        "cost_ratio": c, "theoretical_speedup": metrics.theoretical_speedup(summary["mal"], gamma, c),
        "lossless": bool(df["lossless"].all()) if temperature == 0 else None,
        "per_category": {},
        "numeric_path": {"none": "fp32", "drafter-fp16": "fp32 target, fp16-packed drafter",
                         "fp16": "fp16-packed target and drafter"}[fast_path],
    }
    for cat, sub in df.groupby("category", sort=True):
        idx = list(sub.index)
        s = _summarize([base_res[i] for i in idx], [spec_res[i] for i in idx], sub, gamma)
        out["per_category"][str(cat)] = {"n_prompts": len(idx), "mal": s["mal"],
                                         "acceptance_rate": s["acceptance_rate"], "speedup": s["speedup"]}
    return out, df


def _summarize(base_res: list[DecodeResult], spec_res: list[DecodeResult], df: pd.DataFrame, gamma: int) -> dict:
    t_tps = df["target_tokens"].sum() / df["target_seconds"].sum()
    s_tps = df["spec_tokens"].sum() / df["spec_seconds"].sum()
    return {"mal": metrics.mal(spec_res), "acceptance_rate": metrics.acceptance_rate(spec_res),
            "target_tokens_per_s": float(t_tps), "spec_tokens_per_s": float(s_tps), "speedup": float(s_tps / t_tps)}


def run_eval(cfg: EvalConfig, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """`sd2 eval`: load both models and the prompts, then evaluate_pair with threads pinned."""
    prompts = load_prompts(cfg.prompts, cfg.categories, cfg.limit)
    opts = cfg.load
    target, ttok = load_model(cfg.target, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    drafter, dtok = load_model(cfg.drafter, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    with torch_threads(cfg.threads):
        return evaluate_pair(target, ttok, drafter, dtok, prompts, gamma=cfg.gamma,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                             uag=cfg.uag, context=cfg.context, progress=progress,
                             names=(cfg.target, cfg.drafter), fast_path=cfg.fast_path)


def _finite(obj):
    """NaN/inf are not JSON: write null instead (e.g. acceptance at a position never drafted)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temp file + rename): a reader never sees half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
