"""Faster CPU numeric paths for decoding: fp16 weights, fp32 activations and accumulation, sd2's own kernel.

Why a kernel of our own (`sd2/kernels/cpu.c`, built once per machine with the system C compiler and loaded
with ctypes): at batch 1 a decode step reads every weight once, so fp16 weights halve the bytes of fp32; a
verification pass over γ+1 tokens must cost little more than a one-token pass (the engine's `v`), which needs
each converted weight tile reused by all γ+1 rows and the work split over the cores — fbgemm's fp16 GEMM (torch
marks it deprecated, and runs it on one thread) is 1.6–2.3× slower at 5–48 rows here (bench/kernel.py). And
every output element is one fixed fused multiply-add chain, so a token's logits do not depend on which tokens
are verified with it: speculative decoding reproduces target-only decoding on this path by construction.

fp16 weights change numerics slightly, so: applying the path to a *drafter* never affects losslessness (the
target decides every token); applying it to the *target* changes the reference too, so spec and target-only
must both run it (lossless holds within the path) and results name the path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import c_float, c_int, c_int64, c_void_p
from pathlib import Path

import torch
from torch import nn

from sd2.config import FAST_PATHS as PATHS  # noqa: F401 - one list of numeric paths
from sd2.errors import UserError

# the paths that run fp16 weights through sd2's kernel (CPU only)
PACKED = ("fp16", "drafter-fp16", "lean-fp16", "fp16-lean-drafter")
SOURCE = Path(__file__).parent / "kernels" / "cpu.c"
# -fopenmp: the kernel's threads come from the OpenMP runtime torch has already loaded (same libgomp soname);
# -ffp-contract=off: only the code's explicit FMAs fuse, so any x86-64 build (AVX-512 or not) gives the same bits
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
COLS = 64  # the kernel's column tile (weights are packed [N/64][K][64])


def require_cpu(fast_path: str, device) -> None:
    """The fp16 kernel runs on the CPU only: the one check (and message) for every stage that picks a path."""
    if fast_path in PACKED and torch.device(device).type != "cpu":
        raise UserError(f"--fast-path {fast_path}: fp16 weights run through sd2's CPU kernel; use --fast-path none "
                        f"(or lean) on {device}, or --device cpu")


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code built on one CPU may not run on another sharing SD2_HOME."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def kernel_version() -> str:
    """A digest of the kernel's source and the flags that decide its numbers (not -march: every x86-64 build gives
    the same bits, tested): results and caches of the fp16 paths are per kernel version."""
    flags = [f for f in CFLAGS if not f.startswith("-march")]
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]


def compiler() -> str | None:
    """$CC when set, else cc or gcc on the PATH."""
    return shutil.which(os.environ["CC"]) if os.environ.get("CC") else (shutil.which("cc") or shutil.which("gcc"))


def build(cc: str, lib: Path, flags: list[str] = CFLAGS) -> None:
    """Compile the kernel into `lib`, built aside and moved in whole (nothing half-written is left)."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        run = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
        if run.returncode != 0:
            first = (run.stderr.strip().splitlines() or ["no output"])[0]
            raise UserError(f"--fast-path fp16/lean-fp16: {cc} could not build sd2's fp16 kernel ({first}); "
                            "use --fast-path lean (fp32) or none")
        os.replace(out, lib)


def load(lib: Path) -> ctypes.CDLL:
    """A built kernel with its functions' signatures."""
    dll = ctypes.CDLL(str(lib))
    dll.sd2_f16_gemm_mt.argtypes = [c_void_p, c_int64, c_int64, c_void_p, c_int64, c_void_p, c_int]
    dll.sd2_layer_forward.argtypes = [ctypes.POINTER(LayerSpec), c_void_p, c_int64, c_int64, c_void_p, c_void_p,
                                      c_int64, c_void_p, c_void_p, c_void_p, c_int]
    dll.sd2_layer_scratch.argtypes = [ctypes.POINTER(LayerSpec), c_int64, c_int64, c_int]
    dll.sd2_rms.argtypes = [c_void_p, c_int64, c_int64, c_void_p, c_float, c_void_p]
    for fn in (dll.sd2_f16_gemm_mt, dll.sd2_layer_forward, dll.sd2_rms):
        fn.restype = None
    dll.sd2_layer_scratch.restype = c_int64
    dll.sd2_simd.argtypes, dll.sd2_simd.restype = [], ctypes.c_int
    return dll


@functools.lru_cache(maxsize=1)
def kernel() -> ctypes.CDLL:
    """The compiled kernel, built on first use into $SD2_HOME/cache/kernels (keyed by source, flags, compiler and
    CPU: -march=native code may not run on another CPU sharing SD2_HOME) and reused after; a machine without a C
    compiler gets one line naming the alternatives."""
    from sd2.models import sd2_home

    cc = compiler()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_flags().encode()
                         + str(cc).encode()).hexdigest()
    lib = sd2_home() / "cache" / "kernels" / f"cpu-{key[:16]}.so"
    if not lib.exists():
        if cc is None:
            raise UserError("--fast-path fp16/lean-fp16: building sd2's fp16 kernel needs a C compiler "
                            f"({'CC=' + os.environ['CC'] + ' not found' if os.environ.get('CC') else 'cc or gcc'}); "
                            "install one, or use --fast-path lean (fp32) or none")
        build(cc, lib, CFLAGS)
    return load(lib)


class LayerSpec(ctypes.Structure):
    """A Llama decoder layer as the kernel reads it (`sd2_layer` in cpu.c); the tensors it points to are kept
    alive by whoever holds the spec (sd2.lean)."""

    _fields_ = [("hidden", c_int64), ("n_heads", c_int64), ("n_kv", c_int64), ("head_dim", c_int64),
                ("inter", c_int64), ("eps", c_float), ("ln1", c_void_p), ("ln2", c_void_p), ("qkv", c_void_p),
                ("o", c_void_p), ("gate_up", c_void_p), ("down", c_void_p)]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight → fp16 tiles [ceil(N/64), K, 64] (padded columns are zero; values clamped to fp16's range)."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = -(-n // COLS)
    padded = torch.zeros(blocks * COLS, k)
    padded[:n] = w.clamp(-65504.0, 65504.0)
    return padded.half().view(blocks, COLS, k).transpose(1, 2).contiguous()


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x ↦ x·Wᵀ + b with fp16 weights and fp32 accumulation (sd2's kernel), on torch's intra-op threads (column
    blocks split between them; the split changes no bits: each output is computed whole by one thread)."""
    dll = kernel()
    packed = pack(weight)
    out_features, in_features = weight.shape
    b = bias.detach().float().contiguous() if bias is not None else None

    def linear(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, in_features).float().contiguous()
        y = torch.empty(x2.shape[0], out_features)
        dll.sd2_f16_gemm_mt(x2.data_ptr(), x2.shape[0], in_features, packed.data_ptr(), out_features, y.data_ptr(),
                            torch.get_num_threads())
        if b is not None:
            y += b
        return y.reshape(*shape[:-1], out_features).to(x.dtype)
    return linear


class PackedFP16Linear(nn.Module):
    """Inference-only replacement for nn.Linear with fp16 weights run through sd2's kernel."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self._linear = packed_linear(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


def available() -> bool:
    """Whether this machine can build (or has built) the kernel: `auto` picks the fp16 paths only then."""
    try:
        kernel()
        return True
    except (UserError, OSError):
        return False


def vectorized() -> bool:
    """Whether the kernel builds here with vector fp16 conversion (AVX-512, or AVX2 + F16C): only then are the fp16
    paths faster than fp32 (the portable build converts each weight in software, 22-63× slower on an AVX2 core)."""
    return available() and bool(kernel().sd2_simd())


def pack_fp16(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (lm_head included) in place; count MACs *before* calling this."""
    require_cpu("fp16", next(model.parameters()).device)
    kernel()  # one clear line here when the kernel cannot be built
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedFP16Linear(mod))
    return model
