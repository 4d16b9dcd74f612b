"""What copying alone would accept: greedy MAL of drafting only by lookup, on the target's own greedy outputs.

Per prompt the target's greedy output (cached by `sd2 eval --replay-gammas` under SD2_HOME, else decoded here on the
lean-fp16 path), then speculative decoding replayed with drafts from (a) prompt lookup in the context (prompt +
output so far, n ≥ --min-ngram, sd2.specdec.NGramIndex) and (b) optionally a datastore of answers (`--datastore`
distilled dataset dirs, REST-style: the most frequent continuation of the context's last 2–4 tokens there).
No drafter runs, so this is the ceiling copying adds and how often it fires.

    .venv/bin/python bench/lookup_potential.py --min-ngram 2 --datastore DISTILLED_DIR
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2.config import DEFAULT_TARGET, LOOKUP_MAX  # noqa: E402
from sd2.data import encode_prompt, load_distilled, load_prompts  # noqa: E402
from sd2.evaluate import apply_fast_path, greedy_output  # noqa: E402
from sd2.models import load_model, model_digest, sd2_home  # noqa: E402
from sd2.specdec import NGramIndex, SpecDecoder  # noqa: E402


class Datastore:
    """n-gram → where it occurs in a set of token sequences; proposes the majority continuation, token by token."""

    def __init__(self, seqs: list[list[int]], min_n: int):
        self.seqs, self.min_n = seqs, min_n
        self.at: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for si, s in enumerate(seqs):
            for end in range(1, len(s)):
                for n in range(min_n, LOOKUP_MAX + 1):
                    if end >= n:
                        self.at[tuple(s[end - n:end])].append((si, end))

    def propose(self, ctx: list[int], k: int) -> list[int]:
        for n in range(LOOKUP_MAX, self.min_n - 1, -1):
            live = self.at.get(tuple(ctx[-n:]))
            if live:
                out: list[int] = []
                for j in range(k):
                    votes = Counter(self.seqs[si][p + j] for si, p in live if p + j < len(self.seqs[si]))
                    if not votes:
                        break
                    out.append(votes.most_common(1)[0][0])
                    live = [(si, p) for si, p in live if p + j < len(self.seqs[si]) and self.seqs[si][p + j] == out[-1]]
                return out
        return []


def copy_mal(outputs: list[tuple[list[int], list[int]]], gamma: int, min_n: int, store: Datastore | None) -> dict:
    steps = tokens = copied = 0
    for prompt, out in outputs:
        index, pos = NGramIndex(min_n), 0
        while pos < len(out):
            ctx = prompt + out[:pos]
            drafts = index.propose(ctx, gamma) if min_n else []
            if not drafts and store is not None:
                drafts = store.propose(ctx, gamma)
            a = 0
            while a < len(drafts) and pos + a < len(out) and drafts[a] == out[pos + a]:
                a += 1
            steps, copied, pos = steps + 1, copied + bool(drafts), pos + a + 1
        tokens += len(out)
    return {"mal": tokens / steps, "steps_with_a_copy": copied / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--prompts", default=None, help="default: Spec-Bench")
    ap.add_argument("--limit", type=int, default=65)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--min-ngram", type=int, nargs="+", default=[1, 2, 3], help="context lookup (0 = none)")
    ap.add_argument("--datastore", nargs="*", default=[], help="distilled dataset dirs to copy from")
    ap.add_argument("--datastore-min-ngram", type=int, default=2)
    args = ap.parse_args()
    target, tok = load_model(args.target)
    target, _ = apply_fast_path("lean-fp16", target, target)
    prompts = load_prompts(args.prompts, limit=args.limit)
    cache = sd2_home() / "cache" / "target-greedy" / model_digest(args.target)[:20] / "lean-fp16"  # sd2 eval's
    base = SpecDecoder(target, None, target_tokenizer=tok)
    outputs = [(ids, greedy_output(base, ids, args.max_new_tokens, cache))
               for ids in (encode_prompt(tok, p.text) for p in prompts)]
    store = None
    if args.datastore:
        seqs = [tok.encode(r["response"], add_special_tokens=False) for d in args.datastore for r in load_distilled(d)]
        store = Datastore(seqs, args.datastore_min_ngram)
        print(f"datastore: {sum(map(len, seqs))} tokens in {len(seqs)} answers")
    print("| context lookup | datastore | copy-only MAL | steps with a copy |\n|---|---|---|---|")
    for n in args.min_ngram:
        for st in ([None, store] if store is not None else [None]):
            r = copy_mal(outputs, args.gamma, n, st)
            print(f"| {'n ≥ ' + str(n) if n else 'off'} | {'yes' if st else 'no'} | {r['mal']:.3f} | "
                  f"{r['steps_with_a_copy']:.2f} |")


if __name__ == "__main__":
    main()
