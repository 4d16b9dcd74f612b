"""Sparsity patterns: unstructured and N:M (at most N nonzeros in every M consecutive input weights),
their checks, and a per-layer sparsity report measured from the weights themselves."""

from __future__ import annotations

import re

import torch
from torch import nn

from sd2.errors import UserError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' → None; 'N:M' → (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern).strip())
    if not m:
        raise UserError(f"--pattern {pattern!r}: use 'unstructured' or N:M such as 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise UserError(f"--pattern {pattern}: N:M needs 0 < N < M (N nonzeros kept in every M weights)")
    return n, mm


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity {sparsity}: must be in [0, 1)")
    return sparsity


def check_nm_divides(model_linears: dict[str, nn.Linear], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for name, lin in model_linears.items():
        if lin.in_features % nm[1]:
            raise UserError(f"--pattern {nm[0]}:{nm[1]}: M={nm[1]} does not divide the input dimension "
                            f"{lin.in_features} of {name}")


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the M−N lowest scores of every group of M consecutive inputs."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def unstructured_prune_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """True where pruned: the lowest `sparsity` share of scores, per layer or per output row."""
    if sparsity <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        idx = torch.argsort(scores, dim=1)[:, :k]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    k = int(scores.numel() * sparsity)
    idx = torch.argsort(scores.flatten())[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, idx, True).reshape(scores.shape)


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of M consecutive inputs holds at most N nonzeros."""
    rows, cols = weight.shape
    nnz = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return bool((nnz <= n).all())


def sparsity_report(model: nn.Module, layer_filter: str | None = None) -> dict:
    """Per-layer nonzeros measured from the weights (not the requested ratio), plus totals."""
    from sd2.metrics import linear_nonzeros

    layers = {}
    for name, (nnz, total) in linear_nonzeros(model).items():
        if layer_filter and not re.search(layer_filter, name):
            continue
        layers[name] = {"nonzeros": nnz, "total": total, "sparsity": 1 - nnz / total}
    nnz = sum(v["nonzeros"] for v in layers.values())
    tot = sum(v["total"] for v in layers.values())
    return {"layers": layers, "nonzeros": nnz, "total": tot, "sparsity": 1 - nnz / tot if tot else 0.0}


def sparsity_report_from_dir(model_dir, layer_filter: str) -> dict:
    """The same report, read tensor by tensor from a saved safetensors model dir (no model instantiation)."""
    from pathlib import Path

    from safetensors import safe_open

    layers = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                name = key[: -len(".weight")] if key.endswith(".weight") else None
                if name and re.search(layer_filter, name):
                    t = st.get_tensor(key)
                    if t.dim() == 2:
                        nnz = int(torch.count_nonzero(t))
                        layers[name] = {"nonzeros": nnz, "total": t.numel(), "sparsity": 1 - nnz / t.numel()}
    nnz = sum(v["nonzeros"] for v in layers.values())
    tot = sum(v["total"] for v in layers.values())
    return {"layers": layers, "nonzeros": nnz, "total": tot, "sparsity": 1 - nnz / tot if tot else 0.0}
