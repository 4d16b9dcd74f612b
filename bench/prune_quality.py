"""Pruning quality on a drafter: perplexity on held-back distilled text, relative reconstruction error of the
final hidden states, and pruning seconds, for sparsegpt vs wanda vs magnitude at several patterns.

    .venv/bin/python bench/prune_quality.py --model DRAFTER_DIR --data DISTILLED_DIR [--threads 1]

Calibration uses the first rows of the dataset; perplexity/reconstruction use the last `--heldout` rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from sd2.data import encode_prompt
from sd2.distill import load_distilled
from sd2.models import load_model
from sd2.prune import DEFAULT_FILTER, prune_model
from sd2.prune.masks import sparsity_report


@torch.no_grad()
def heldout_metrics(model, dense, tok, rows, seq_len: int):
    nll, n, rec_num, rec_den = 0.0, 0, 0.0, 0.0
    for r in rows:
        p = encode_prompt(tok, r["prompt"])
        ids = (p + tok.encode(r["response"], add_special_tokens=False) + [tok.eos_token_id])[:seq_len]
        x = torch.tensor([ids])
        out = model(input_ids=x, output_hidden_states=True)
        ref = dense(input_ids=x, output_hidden_states=True)
        logits = out.logits[0, len(p) - 1:-1]
        tgt = x[0, len(p):]
        if len(tgt):
            nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
            n += len(tgt)
        h, hr = out.hidden_states[-1][0], ref.hidden_states[-1][0]
        rec_num += float(((h - hr) ** 2).sum())
        rec_den += float((hr ** 2).sum())
    return math.exp(nll / max(n, 1)), rec_num / rec_den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="unstructured@0.5,2:4,unstructured@0.7",
                    help="comma-separated PATTERN[@SPARSITY] (N:M patterns imply their sparsity)")
    ap.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, tok = load_model(args.model)
    ds = load_distilled(args.data)
    rows = list(ds)
    held = rows[-args.heldout:]
    calib_rows = rows[: len(rows) - args.heldout][: args.calib_samples]
    samples = [(encode_prompt(tok, r["prompt"]) + tok.encode(r["response"], add_special_tokens=False))[:args.seq_len]
               for r in calib_rows]
    ppl0, _ = heldout_metrics(dense, dense, tok, held, args.seq_len)
    results = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": ppl0, "rel_recon_error": 0.0,
                "seconds": 0.0}]
    for setting in args.settings.split(","):
        pattern, _, s = setting.partition("@")
        if pattern == "unstructured":
            sparsity = float(s or 0.5)
        else:
            n, m = (int(x) for x in pattern.split(":"))
            sparsity = 1 - n / m
        for method in args.methods.split(","):
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            prune_model(m, method, sparsity, pattern, samples if method != "magnitude" else None, progress=False)
            secs = time.perf_counter() - t0
            ppl, rec = heldout_metrics(m, dense, tok, held, args.seq_len)
            results.append({"method": method, "pattern": pattern,
                            "sparsity": round(sparsity_report(m, DEFAULT_FILTER)["sparsity"], 4),
                            "ppl": ppl, "rel_recon_error": rec, "seconds": secs})
            print(json.dumps(results[-1]), flush=True)
    print("| method | pattern | sparsity (measured, decoder linears) | held-out ppl | rel. recon. error | prune s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['rel_recon_error']:.4f} "
              f"| {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
