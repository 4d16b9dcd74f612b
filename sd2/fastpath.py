"""Faster CPU numeric paths for decoding.

fbgemm's fp16-packed GEMM reads half the bytes of fp32 and handles small-M (1–9 token) matmuls far better
than the stock path on AVX2 CPUs: lm_head 49152×576 at one token ≈ 6× faster here. It changes numerics
slightly (fp16 weights, fp32 accumulation), so: applying it to a *drafter* never affects losslessness (the
target decides every token); applying it to the *target* changes the reference too, so spec and target-only
must both run the packed target (lossless holds within the path) and results must state the path.
"""

from __future__ import annotations

import torch
from torch import nn

from sd2.config import FAST_PATHS as PATHS  # noqa: F401 - one list of numeric paths
from sd2.errors import UserError

PACKED = ("fp16", "drafter-fp16", "lean-fp16")  # the paths that use fbgemm's packed GEMMs (CPU only)


def require_cpu(fast_path: str, device) -> None:
    """fbgemm packing runs on the CPU only: the one check (and message) for every stage that picks a path."""
    if fast_path in PACKED and torch.device(device).type != "cpu":
        raise UserError(f"--fast-path {fast_path}: fbgemm packing is a CPU path; use --fast-path none (or lean) on "
                        f"{device}, or --device cpu")


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x ↦ x·Wᵀ + b with fbgemm's fp16-packed weight (fp32 accumulation). The one place that calls the fbgemm
    fp16 ops, which torch marks deprecated: replacing them means changing this function only."""
    w = weight.detach().float().contiguous()
    packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w)
    out_features, in_features = w.shape
    b = bias.detach().float() if bias is not None else torch.zeros(out_features)

    def linear(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten.fbgemm_linear_fp16_weight(x.reshape(-1, in_features).float().contiguous(), packed, b)
        return y.reshape(*shape[:-1], out_features).to(x.dtype)
    return linear


class PackedFP16Linear(nn.Module):
    """Inference-only replacement for nn.Linear backed by fbgemm's fp16-packed weight."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self._linear = packed_linear(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


def available() -> bool:
    try:
        lin = nn.Linear(8, 4)
        PackedFP16Linear(lin)(torch.randn(2, 8))
        return True
    except (RuntimeError, AttributeError):
        return False


def pack_fp16(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (lm_head included) in place; count MACs *before* calling this."""
    require_cpu("fp16", next(model.parameters()).device)
    if not available():
        raise UserError("--fast-path: fbgemm fp16 GEMM is not available in this torch build/CPU; use 'none'")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedFP16Linear(mod))
    return model
