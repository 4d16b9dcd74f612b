"""Can a sparse kernel turn a pruned drafter's zeros into time on this CPU? (issue 16, cost that the machine feels)

One process, variants alternating, medians: a SmolLM2-135M linear layer with SparseGPT-like unstructured zeros at
batch 1 (a draft step) and 5 rows (a γ = 4 verification), run as dense fp32 (`F.linear`), as torch's CSR sparse
matmul (fp32; what torch offers on a CPU), and through sd2's fp16-weight kernel (dense: the engine's lean-fp16
path). A sparse path would be worth keeping only if it beat the dense kernels at ≥ 50% zeros.

    .venv/bin/python bench/sparse_kernel.py --threads 1
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
import torch.nn.functional as F  # noqa: E402

from bench.kernel import SHAPES  # noqa: E402
from sd2 import fastpath  # noqa: E402


def alternating_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median ms of each variant, timed in turn (one call of each per round) so drift hits all alike."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.72, 0.9])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta")  # torch's CSR support is marked beta
    g = torch.Generator().manual_seed(0)
    print("| layer | zeros | rows | dense fp32 (ms) | CSR fp32 (× dense) | sd2 fp16 kernel, dense (× dense fp32) |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        if name.startswith("lm_head"):
            continue  # the draft head is compact and dense
        for sp in args.sparsities:
            w = torch.randn(n, k, generator=g)
            w[torch.rand(n, k, generator=g) < sp] = 0
            csr, f16 = w.to_sparse_csr(), fastpath.packed_linear(w) if fastpath.vectorized() else None
            for m in args.rows:
                x = torch.randn(m, k, generator=g)
                runs = {"dense": lambda: F.linear(x, w), "csr": lambda: torch.sparse.mm(csr, x.t())}
                if f16 is not None:
                    runs["f16"] = lambda: f16(x)
                for fn in runs.values():  # warm-up
                    fn()
                ms = alternating_medians(runs, args.repeats)
                f16_cell = f"{ms['f16'] / ms['dense']:.2f}×" if "f16" in ms else "— (kernel not vectorized here)"
                print(f"| {name} | {sp:.0%} | {m} | {ms['dense']:.3f} | {ms['csr'] / ms['dense']:.2f}× | {f16_cell} |")


if __name__ == "__main__":
    main()
