"""Where a stage runs: one pure function from (visible GPUs, model size, request) to a placement.

Every stage (distill, train, prune, layer-prune, eval) resolves `--device` / `--dtype` here and nowhere else,
so a request that cannot run is refused in one place, before anything is loaded or written:
`auto` is the first visible GPU with bfloat16 (float16 where the GPU lacks bf16), else the CPU in float32.
A model larger than one GPU is spread over the visible GPUs (a `device_map` with a per-GPU memory budget),
unless the request pins one GPU (`cuda:N`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd2.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# share of a GPU's memory the weights may take; the rest is for activations, KV caches, Hessians
WEIGHT_SHARE = 0.8


@dataclass(frozen=True)
class Gpu:
    index: int
    total_bytes: int
    bf16: bool = True
    name: str = ""


@dataclass(frozen=True)
class Placement:
    """Resolved device and dtype; `max_memory` is set when the model is spread over several GPUs."""

    device: str  # "cpu" or "cuda:N" (the first device of a spread model)
    dtype: str  # a key of DTYPES
    max_memory: dict[int, int] = field(default_factory=dict)
    workers: tuple[str, ...] = ()  # devices of data-parallel workers (distillation)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def spread(self) -> bool:
        return len(self.max_memory) > 1

    def describe(self) -> str:
        where = f"{len(self.max_memory)} GPUs" if self.spread else self.device
        return f"{where}, {self.dtype}"


def visible_gpus() -> list[Gpu]:
    """The GPUs this process sees (CUDA_VISIBLE_DEVICES applies)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(Gpu(i, int(props.total_memory), bf16=props.major >= 8, name=props.name))
    return out


def plan(device: str, dtype: str, gpus: list[Gpu], model_bytes: int | None = None, workers: int | None = None
         ) -> Placement:
    """The placement for a request: pure (tested without a GPU by passing the GPUs in)."""
    device = (device or "auto").strip()
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu":
        if dtype not in ("auto", *DTYPES):
            raise UserError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
        n = workers or 1
        return Placement("cpu", "float32" if dtype == "auto" else dtype, workers=("cpu",) * n)
    if not device.startswith("cuda") or (device != "cuda" and not device[5:].lstrip(":").isdigit()):
        raise UserError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if not gpus:
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    pinned = device != "cuda"
    index = int(device.split(":")[1]) if pinned else 0
    if index >= len(gpus):
        raise UserError(f"--device {device}: only {len(gpus)} GPU(s) visible (cuda:0–cuda:{len(gpus) - 1}); "
                        "pick one of those or check CUDA_VISIBLE_DEVICES")
    gpu = gpus[index]
    if dtype == "auto":
        dtype = "bfloat16" if gpu.bf16 else "float16"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    if dtype == "bfloat16" and not gpu.bf16:
        raise UserError(f"--dtype bfloat16: {gpu.name or f'cuda:{index}'} has no bfloat16 support; use float16")
    if workers is not None and workers > (1 if pinned else len(gpus)):
        raise UserError(f"--workers {workers}: more than the {1 if pinned else len(gpus)} GPU(s) available to "
                        f"--device {device}; use at most that many")
    worker_devices = (f"cuda:{index}",) if pinned else tuple(f"cuda:{g.index}" for g in gpus[:workers or len(gpus)])
    budget = {g.index: int(g.total_bytes * WEIGHT_SHARE) for g in (gpus if not pinned else [gpu])}
    if model_bytes is None or model_bytes <= budget[index] or pinned:
        if model_bytes is not None and model_bytes > budget[index]:
            raise UserError(f"--device {device}: the model needs {model_bytes / 2**30:.1f} GiB in {dtype}, more than "
                            f"{WEIGHT_SHARE:.0%} of that GPU; use --device cuda to spread it over all GPUs")
        return Placement(f"cuda:{index}", dtype, workers=worker_devices)
    if model_bytes > sum(budget.values()):
        raise UserError(f"--device {device}: the model needs {model_bytes / 2**30:.1f} GiB in {dtype}, more than the "
                        f"{sum(budget.values()) / 2**30:.1f} GiB the {len(gpus)} visible GPU(s) offer")
    # spread: as few GPUs as needed, in order, so pipeline stages stay short
    used, need = {}, model_bytes
    for g in gpus:
        if need <= 0:
            break
        used[g.index] = budget[g.index]
        need -= budget[g.index]
    return Placement(f"cuda:{gpus[0].index}", dtype, max_memory=used, workers=(f"cuda:{gpus[0].index}",))


def weight_bytes(model_dir: str | Path, dtype: str) -> int | None:
    """Bytes the weights of a local model dir take in `dtype` (from the safetensors sizes; None if unknown)."""
    d = Path(model_dir)
    files = list(d.glob("*.safetensors")) if d.is_dir() else []
    if not files:
        return None
    stored = 4
    try:
        cfg = json.loads((d / "config.json").read_text())
        stored = {"bfloat16": 2, "float16": 2}.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), 4)
    except (OSError, ValueError):
        pass
    size = sum(f.stat().st_size for f in files)
    return int(size * DTYPES[dtype].itemsize / stored)


def resolve(device: str = "auto", dtype: str = "auto", model_dir=None, workers: int | None = None) -> Placement:
    """plan() for this machine's GPUs and, on a GPU, the size of a local model (`model_dir`: a path, or a
    callable returning one, called only then, so a bad request fails before any model is fetched)."""
    gpus = visible_gpus()
    first = plan(device, dtype, gpus, None, workers)  # refuses a bad request first
    if model_dir is None or not first.is_cuda:
        return first
    size = weight_bytes(model_dir() if callable(model_dir) else model_dir, first.dtype)
    return plan(device, dtype, gpus, size, workers)


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 math is fast here: a GPU, or a CPU with AVX-512 BF16 or AMX. Elsewhere torch emulates bf16
    GEMMs on the CPU: a 2048 × 576 × 1536 GEMM takes 617 ms in bf16 against 77 ms in fp32 on an AVX2-only EPYC
    core, while on a Zen 4 core with AVX-512 BF16 bf16 is 2.1× faster than fp32."""
    if str(device).startswith("cuda"):
        return True
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def train_dtype(requested: str | None, dtype: str, device: str = "auto") -> str:
    """The training precision a form asks for: `fast` = 16-bit mixed precision where this machine runs it natively
    (on a GPU: `auto`, bf16 or fp16 as the GPU allows; on a CPU: bf16 with AVX-512 BF16 or AMX), else float32;
    None = the stages' `dtype`."""
    if requested is None:
        return dtype
    if requested != "fast":
        return requested
    if device.startswith("cuda") or (device == "auto" and visible_gpus()):
        return "auto"
    return "bfloat16" if native_bf16("cpu") else "float32"


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it (no-op on the CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextmanager
def torch_threads(n: int | None):
    """Pin torch's intra-op threads for a measurement, restoring them afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
