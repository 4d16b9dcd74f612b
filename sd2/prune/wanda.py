"""Wanda (Sun et al., 2023): score |W_ij| · ||X_j||₂, compared within each output row (or N:M group)."""

from __future__ import annotations

import torch

from sd2.prune.masks import nm_prune_mask, unstructured_prune_mask


class WandaStats:
    """Running sum of squared input activations per input feature."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]


@torch.no_grad()
def prune_wanda(weight: torch.Tensor, stats: WandaStats, sparsity: float,
                nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero weights in place; returns the pruned mask."""
    scores = weight.abs().float() * stats.sq.sqrt().float().to(weight.device).unsqueeze(0)
    mask = nm_prune_mask(scores, *nm) if nm else unstructured_prune_mask(scores, sparsity, per_row=True)
    weight[mask] = 0
    return mask
