"""Benchmark of sd2's CPU kernel (sd2/kernels/cpu.c) in one process (variants alternate; medians).

1. GEMMs: the kernel's fp16-weight GEMM against fbgemm's fp16-packed one (torch's, deprecated; what the fp16
   paths used before) on SmolLM2-135M's layer shapes, at 1, 5 (a γ=4 verification), 16 and 48 rows.
2. A whole target forward on `lean-fp16` (one kernel call per decoder layer) at several context lengths: one new
   token vs γ+1 = 5 (the engine's verify cost v), on the real model.

    .venv/bin/python bench/kernel.py --threads 2
    .venv/bin/python bench/kernel.py --threads 1 --contexts 64 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sd2 import fastpath, lean  # noqa: E402
from sd2.config import DEFAULT_TARGET  # noqa: E402
from sd2.models import load_model  # noqa: E402

SHAPES = {"qkv 960×576": (960, 576), "o 576×576": (576, 576), "gate_up 3072×576": (3072, 576),
          "down 576×1536": (576, 1536), "lm_head 49152×576": (49152, 576)}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def gemms(rows: list[int], repeats: int) -> None:
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    print("| GEMM | rows | sd2 kernel ms | fbgemm fp16 ms | fbgemm ÷ sd2 |\n|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        ours, packed, bias = fastpath.packed_linear(w), torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w), torch.zeros(n)
        for m in rows:
            x = torch.randn(m, k)
            a = b = 0.0
            for r in range(2):  # alternate which runs first
                runs = [lambda: ours(x), lambda: torch.ops.aten.fbgemm_linear_fp16_weight(x, packed, bias)]
                res = [median_ms(f, repeats) for f in (runs if r == 0 else runs[::-1])]
                a, b = (a + res[0], b + res[1]) if r == 0 else (a + res[1], b + res[0])
            print(f"| {name} | {m} | {a / 2:.3f} | {b / 2:.3f} | {b / a:.2f}× |")


def forwards(target: str, contexts: list[int], gamma: int, repeats: int) -> None:
    model, _ = load_model(target)
    lm = lean.LeanLM(model, fp16_weights=True)
    print(f"\n| context | one-token forward ms | {gamma + 1}-token forward ms | v |\n|---|---|---|---|")
    for ctx in contexts:
        ids = [1000 + i % 20000 for i in range(ctx)]
        s = lm.session(ctx + gamma + 1)
        s.forward(ids, keep=1)
        one, many = [], []
        for _ in range(repeats):  # interleaved, each rolled back to the context
            for n, out in ((1, one), (gamma + 1, many)):
                t0 = time.perf_counter()
                s.forward(list(range(5, 5 + n)), keep=n)
                out.append(time.perf_counter() - t0)
                s.rollback(ctx)
        a, b = statistics.median(one) * 1e3, statistics.median(many) * 1e3
        print(f"| {ctx} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5, 16, 48])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 768])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, kernel {fastpath.kernel_version()}\n")
    gemms(args.rows, args.repeats)
    forwards(args.target, args.contexts, args.gamma, args.repeats)


if __name__ == "__main__":
    main()
