"""Benchmark of self-distillation's generation, in one process (runs alternate; medians over repeats).

Same target, numeric path, seeds and batches for both sides:
  - `hf`: transformers' `generate` on the left-padded batch (what sd2 used until stop 21): every row is computed
    until the longest one ends;
  - `sd2`: `sd2.distill.generate_batch`, whose rows leave the batch (and the KV cache) at their EOS.
Reports generated tokens/s per batch size and whether the greedy rows are identical.

    .venv/bin/python bench/distill_speed.py                            # recipe seeds, batch 16 and 48, 2 threads
    .venv/bin/python bench/distill_speed.py --batch-sizes 16 32 64 --limit 96 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sd2.config import DEFAULT_TARGET, DistillConfig  # noqa: E402
from sd2.data import encode_prompt, load_seed_mix  # noqa: E402
from sd2.distill import _fitting, _left_padded, generate_batch, request_text  # noqa: E402
from sd2.fastpath import pack_fp16  # noqa: E402
from sd2.models import load_model  # noqa: E402
from sd2.specdec import eos_ids  # noqa: E402

SEEDS = "dolly-15k-subset.jsonl:480+gsm8k_train.jsonl:160"  # the recipes' file seeds (configs/drafter-smollm2*.yaml)


def hf_rows(model, tok, encoded, max_new_tokens):
    """Greedy rows from transformers' generate (cut at the first EOS)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_padded(encoded, pad)
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)[:, width:].tolist()
    stop = eos_ids(model, tok)
    return [row[:next((i for i, t in enumerate(row) if t in stop), len(row))] for row in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--prompts", default=SEEDS)
    ap.add_argument("--limit", type=int, default=96, help="seeds timed (after the --max-prompt-tokens filter)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--max-prompt-tokens", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fast-path", choices=["none", "fp16"], default="fp16")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.target)
    if args.fast_path == "fp16":
        pack_fp16(model)
    cfg = DistillConfig(target=args.target, prompts=args.prompts, out=Path("unused"),
                        max_prompt_tokens=args.max_prompt_tokens)
    seeds = _fitting(cfg, load_seed_mix(args.prompts)[0])
    seeds = seeds[::max(1, len(seeds) // args.limit)][:args.limit]  # spread over the mix's sources
    seeds.sort(key=lambda p: len(p.text))  # what distill does within a shard
    encoded = [encode_prompt(tok, request_text(p, "regenerate")) for p in seeds]
    report = {"target": args.target, "fast_path": args.fast_path, "threads": args.threads, "seeds": len(seeds),
              "max_new_tokens": args.max_new_tokens, "rows": []}
    for bs in args.batch_sizes:
        walls = {"hf": [], "sd2": []}
        tokens = {}
        for _ in range(args.repeats):
            for side in ("hf", "sd2"):
                t0, rows = time.perf_counter(), []
                for b in range(0, len(encoded), bs):
                    chunk = encoded[b:b + bs]
                    if side == "hf":
                        rows += hf_rows(model, tok, chunk, args.max_new_tokens)
                    else:
                        rows += [r[1] for r in generate_batch(model, tok, [], encoded=chunk, temperature=0.0, seed=0,
                                                              max_new_tokens=args.max_new_tokens)]
                walls[side].append(time.perf_counter() - t0)
                tokens.setdefault(side, rows)
        same = tokens["hf"] == tokens["sd2"]
        n = sum(map(len, tokens["sd2"]))
        row = {"batch_size": bs, "tokens": n, "identical_rows": same,
               **{f"{s}_tok_s": round(n / statistics.median(w), 1) for s, w in walls.items()}}
        row["speedup"] = round(row["sd2_tok_s"] / row["hf_tok_s"], 2)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
