"""Benchmark: target-only greedy vs HF assisted generation vs sd2's engine, same pair, same prompts, one process.

Prints tokens/s (median over repeats), ratios, MAL of both speculative paths (they must agree) and the
lossless check. Threads are pinned (default 1: on this 2-core machine two threads are slower under load).

    .venv/bin/python bench/specdec.py                         # derived drafter (layers 0-9 + 29)
    .venv/bin/python bench/specdec.py --drafter smollm2-135m-instruct   # drafter == target: MAL = γ+1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import GenerationConfig

from sd2 import metrics
from sd2.config import DEFAULT_TARGET
from sd2.data import encode_prompt, load_prompts
from sd2.fastpath import pack_fp16
from sd2.models import load_model, save_model, sd2_home
from sd2.prune.layers import keep_layers
from sd2.specdec import DecodeResult, SpecDecoder, hf_assisted_generate


def derived_drafter(target: str) -> str:
    d = sd2_home() / "drafters" / f"{target}-L0-9_29"
    if not (d / "config.json").exists():
        m, tok = load_model(target)
        save_model(keep_layers(m, list(range(10)) + [29]), tok, d, overwrite=True)
    return str(d)


def hf_target_only(model, ids, n) -> DecodeResult:
    t0 = time.perf_counter()
    inp = torch.tensor([ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=n)
    return DecodeResult(tokens=out[0, len(ids):].tolist(), target_passes=out.shape[1] - len(ids),
                        seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--drafter", default=None, help="default: the target's layers 0-9 + 29")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target, tok = load_model(args.target)
    drafter_spec = args.drafter or derived_drafter(args.target)
    drafter, _ = load_model(drafter_spec)
    # Pin generation configs so HF's paths don't sample or stop on a max_length default.
    for m in (target, drafter):
        m.generation_config = GenerationConfig(eos_token_id=m.generation_config.eos_token_id,
                                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
    prompts = [encode_prompt(tok, p.text) for p in load_prompts(None, limit=args.limit)]
    ours_base = SpecDecoder(target, target_tokenizer=tok)
    ours_spec = SpecDecoder(target, drafter, gamma=args.gamma, target_tokenizer=tok)
    drafter16 = pack_fp16(copy.deepcopy(drafter))  # numerics of the drafter only: the target decides every token
    ours_spec16 = SpecDecoder(target, drafter16, gamma=args.gamma, target_tokenizer=tok)
    methods = {
        "hf_target_only": lambda ids: hf_target_only(target, ids, args.max_new_tokens),
        "sd2_target_only": lambda ids: ours_base.generate(ids, args.max_new_tokens),
        "hf_assisted": lambda ids: hf_assisted_generate(target, drafter, ids, gamma=args.gamma,
                                                        max_new_tokens=args.max_new_tokens),
        "sd2_spec": lambda ids: ours_spec.generate(ids, args.max_new_tokens),
        "hf_assisted_fp16_drafter": lambda ids: hf_assisted_generate(target, drafter16, ids, gamma=args.gamma,
                                                                     max_new_tokens=args.max_new_tokens),
        "sd2_spec_fp16_drafter": lambda ids: ours_spec16.generate(ids, args.max_new_tokens),
    }
    for fn in methods.values():  # warm-up
        fn(prompts[0][:32])
    tps: dict[str, list[float]] = {k: [] for k in methods}
    last: dict[str, list[DecodeResult]] = {}
    for r in range(args.repeats):
        results: dict[str, list[DecodeResult]] = {k: [] for k in methods}
        names = list(methods) if r % 2 == 0 else list(reversed(methods))  # alternate order against drift
        for ids in prompts:
            for k in names:
                results[k].append(methods[k](ids))
        for k, rs in results.items():
            tps[k].append(sum(len(x.tokens) for x in rs) / sum(x.seconds for x in rs))
        last = results
    med = {k: statistics.median(v) for k, v in tps.items()}
    ref = [x.tokens for x in last["sd2_target_only"]]
    c = (metrics.macs_per_token(drafter)["macs_per_token"] / metrics.macs_per_token(target)["macs_per_token"])
    mal_ours = metrics.mal(last["sd2_spec"])
    theo = metrics.theoretical_speedup(mal_ours, args.gamma, c)
    report = {
        "target": args.target, "drafter": drafter_spec, "gamma": args.gamma, "threads": args.threads,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "tokens_per_s_median": med,
        "mal_sd2": mal_ours, "mal_hf_assisted": metrics.mal(last["hf_assisted"]),
        "mal_sd2_fp16_drafter": metrics.mal(last["sd2_spec_fp16_drafter"]),
        "mal_hf_assisted_fp16_drafter": metrics.mal(last["hf_assisted_fp16_drafter"]),
        "sd2_vs_hf_assisted": med["sd2_spec"] / med["hf_assisted"],
        "sd2_fp16_drafter_vs_hf_assisted": med["sd2_spec_fp16_drafter"] / med["hf_assisted"],
        "sd2_fp16_drafter_vs_hf_assisted_fp16_drafter": med["sd2_spec_fp16_drafter"] / med["hf_assisted_fp16_drafter"],
        "measured_speedup_fp16_drafter": med["sd2_spec_fp16_drafter"] / med["sd2_target_only"],
        "measured_speedup": med["sd2_spec"] / med["sd2_target_only"],
        "cost_ratio": c, "theoretical_speedup": theo,
        "measured_over_theoretical": (med["sd2_spec"] / med["sd2_target_only"]) / theo,
        "lossless_sd2": [x.tokens for x in last["sd2_spec"]] == ref,
        "lossless_sd2_fp16_drafter": [x.tokens for x in last["sd2_spec_fp16_drafter"]] == ref,
        "lossless_hf_assisted": [x.tokens for x in last["hf_assisted"]] == ref,
        "sd2_target_only_equals_hf_greedy": [x.tokens for x in last["hf_target_only"]] == ref,
        "torch": torch.__version__, "numeric_path": "fp32 target (stock torch CPU GEMM); *_fp16_drafter: "
                                                    "fbgemm fp16-packed drafter",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
