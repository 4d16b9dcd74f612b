"""sd2's fp16 GEMM as built for this CPU against the portable build (baseline x86-64: what a CPU without AVX-512 ran
before the AVX2 + F16C path) and torch's fp32 GEMM, in one process, 1 thread, medians.

    .venv/bin/python bench/kernel_builds.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sd2 import fastpath  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import median_ms as _median_ms  # noqa: E402  (bench/kernel.py's timer)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        generic = Path(tmp) / "generic.so"
        fastpath.build(fastpath.compiler(), generic, ["-march=x86-64" if f.startswith("-march") else f
                                                      for f in fastpath.CFLAGS])
        dlls = {"portable build": fastpath.load(generic), "this CPU's build": fastpath.kernel()}
        print(f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}; this build vectorised: "
              f"{bool(fastpath.kernel().sd2_simd())}")
        print("| GEMM | rows | " + " | ".join(dlls) + " | torch fp32 |")
        print("|---|---|" + "---|" * (len(dlls) + 1))
        for n_out, k in ((1536, 576), (49152, 576)):
            w = torch.randn(n_out, k) * 0.02
            packed = fastpath.pack(w)
            reps = 7 if n_out < 10_000 else 3
            for m in (1, 5):
                x = torch.randn(m, k)
                y = torch.empty(m, n_out)
                cells = [_median_ms(lambda d=d: d.sd2_f16_gemm_mt(x.data_ptr(), m, k, packed.data_ptr(), n_out,
                                                                   y.data_ptr(), 1), reps) for d in dlls.values()]
                cells.append(_median_ms(lambda: F.linear(x, w), 7))
                print(f"| {k} → {n_out} | {m} | " + " | ".join(f"{c:.3f} ms" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
