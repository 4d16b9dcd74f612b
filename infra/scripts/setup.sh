#!/usr/bin/env bash
# Create or update .venv/ at the repo root with everything sd2 needs. Idempotent: safe to run twice.
# A CPU torch (2.13.0) is installed first when no NVIDIA GPU is present, so that nothing pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
# pip prints a warning per package for local index folders that this machine lacks; keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }; return "${PIPESTATUS[0]}"; }
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
quiet "${pip[@]}" install -U pip "setuptools>=77" wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch (CUDA build)"
    quiet "${pip[@]}" install "torch${SD2_TORCH_SPEC:->=2.4}"
  else
    echo "[setup] no GPU: installing CPU torch ${SD2_CPU_TORCH:-2.13.0}"
    quiet "${pip[@]}" install "torch==${SD2_CPU_TORCH:-2.13.0}"
  fi
fi
echo "[setup] installing sd2 and its dependencies (editable)"
quiet "${pip[@]}" install -e ".[test]"
.venv/bin/python -c 'import torch, transformers, prefect, mlflow, deepspeed, datasets, pandas
print(f"[setup] ready: torch {torch.__version__}, transformers {transformers.__version__}, prefect {prefect.__version__}, "
      f"mlflow {mlflow.__version__}, deepspeed {deepspeed.__version__}")' 2>&1 | grep "^\[setup\]"
