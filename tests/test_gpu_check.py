"""bench/gpu_check.py runs in CI on the CPU (tiny models): the same script is the GPU machine's smoke test."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_passes_on_cpu():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--repeats", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for line in ("distill on cpu, float32", "train on cpu, float32", "sparsegpt on cpu, float32",
                 "self-draft: MAL 4.00",
                 "speculative outputs equal target-only and HF greedy", "all checks passed"):
        assert line in out, out
    assert "FAIL" not in out
