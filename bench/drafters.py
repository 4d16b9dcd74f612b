"""Drafter table: Spec-Bench and held-out MAL of several drafters (or the snapshots of one training run, for a
learning curve), in one process, with the same target, numeric path and prompts for all.

Per drafter: timed speculative runs on `--limit` Spec-Bench prompts (measured speedup vs target-only in the same
run, lossless check), greedy MAL at γ by exact replay over `--replay-limit` Spec-Bench prompts (5 per category at
65) and over the held-out prompts of kinds the seed data does not name (bench/heldout_prompts.jsonl), MACs ratio c.

    .venv/bin/python bench/drafters.py DRAFTER_DIR [DRAFTER_DIR ...] --out table.json
    .venv/bin/python bench/drafters.py --curve CURVE_DIR --out curve.json   # every step-N/ snapshot in it
    .venv/bin/python bench/drafters.py DRAFTER_DIR --lookups 0 2 1          # alone and with prompt lookup
    .venv/bin/python bench/drafters.py DRAFTER_DIR --shared-kv off on        # its own KV cache, the target's
    .venv/bin/python bench/drafters.py DRAFTER_DIR --prompt-vocab off on     # compact head alone, + the prompt's rows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2.config import DEFAULT_TARGET, EvalConfig  # noqa: E402
from sd2.evaluate import run_eval  # noqa: E402

HELDOUT = Path(__file__).with_name("heldout_prompts.jsonl")


def _row(name: str, drafter: str, args, lookup: int = 0, shared_kv: str = "auto", prompt_vocab: bool = False
         ) -> dict:
    t0 = time.perf_counter()
    common = dict(target=args.target, drafter=drafter, gamma=args.gamma, max_new_tokens=args.max_new_tokens,
                  threads=args.threads, replay_gammas=[args.gamma], lookup=lookup, shared_kv=shared_kv,
                  prompt_vocab=prompt_vocab)
    spec, _ = run_eval(EvalConfig(**common, limit=args.limit, replay_limit=args.replay_limit), progress=False)
    held, _ = run_eval(EvalConfig(**common, prompts=args.heldout, limit=1, replay_limit=args.heldout_limit),
                       progress=False)
    rs, rh = spec["replay"]["gammas"][str(args.gamma)], held["replay"]["gammas"][str(args.gamma)]
    train = Path(drafter) / "sd2_train.json"
    info = json.loads(train.read_text()) if train.exists() else {}
    return {"drafter": name, "path": drafter, "lookup": lookup, "lookup_step_share": spec.get("lookup_step_share"),
            "shared_kv": spec["shared_kv"], "prompt_vocab": spec["prompt_vocab"],
            "prompt_vocab_rows": spec.get("prompt_vocab_rows"),
            "heldout_prompt_vocab_rows": held.get("prompt_vocab_rows"),
            "mal": rs["mal"], "mal_ci95": rs["mal_ci95"],
            "acceptance_rate": rs["acceptance_rate"], "per_position": rs["per_position_acceptance"],
            "heldout_mal": rh["mal"], "heldout_ci95": rh["mal_ci95"], "cost_ratio": spec["cost_ratio"],
            "per_category": rs["per_category"], "heldout_per_category": rh["per_category"],
            "engine_mal": spec["mal"], "speedup": spec["speedup"], "predicted_speedup": spec.get("predicted_speedup"),
            "drafter_time_ratio": spec.get("drafter_time_ratio"), "lossless": spec["lossless"],
            "n_replay": spec["replay"]["n_prompts"], "n_heldout": held["replay"]["n_prompts"],
            "train_tokens": info.get("train_tokens"), "train_runtime_s": info.get("train_runtime_s"),
            "train_loss": info.get("train_loss"), "eval_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="*", help="drafter dirs (name=DIR to name a row)")
    ap.add_argument("--curve", type=Path, help="a --curve-dir of `sd2 train`: one row per step-N snapshot")
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, default=13, help="timed speculative runs (one per Spec-Bench category)")
    ap.add_argument("--replay-limit", type=int, default=65, help="Spec-Bench prompts of the replayed MAL")
    ap.add_argument("--heldout", default=str(HELDOUT))
    ap.add_argument("--heldout-limit", type=int, default=26, help="held-out prompts of the replayed MAL")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lookups", type=int, nargs="+", default=[0],
                    help="a row per drafter and value: prompt lookup's shortest n-gram in front of it (0 = off)")
    ap.add_argument("--shared-kv", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                    help="a row per drafter and value: whether it reads the target's KV cache (auto: as trained)")
    ap.add_argument("--prompt-vocab", nargs="+", default=["off"], choices=["off", "on"],
                    help="a row per drafter and value: whether a compact head also scores the prompt's tokens")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    todo = [tuple(d.split("=", 1)) if "=" in d else (Path(d).name, d) for d in args.drafters]
    if args.curve:
        steps = sorted(args.curve.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        todo += [(p.name, str(p)) for p in steps]
    rows = []
    print("| drafter | Spec-Bench MAL [95% CI] | acceptance | held-out MAL | c | measured speedup | lossless |")
    print("|---|---|---|---|---|---|---|")
    for (name, path), lookup, share, pv in ((t, k, s, v) for t in todo for k in args.lookups for s in args.shared_kv
                                            for v in args.prompt_vocab):
        name = (f"{name}+lookup{lookup}" if lookup else name) + (f" shared-kv {share}" if share != "auto" else "") + (
            " +prompt-vocab" if pv == "on" else "")
        r = _row(name, path, args, lookup, share, pv == "on")
        rows.append(r)
        print(f"| {name} | {r['mal']:.3f} [{r['mal_ci95'][0]:.2f}–{r['mal_ci95'][1]:.2f}] | "
              f"{r['acceptance_rate']:.3f} | {r['heldout_mal']:.3f} | {r['cost_ratio']:.3f} | {r['speedup']:.2f}× | "
              f"{r['lossless']} |", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
