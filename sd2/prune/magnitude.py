"""Magnitude pruning: the baseline that needs no data — drop the smallest |w| of each layer."""

from __future__ import annotations

import torch

from sd2.prune.masks import nm_prune_mask, unstructured_prune_mask


@torch.no_grad()
def prune_magnitude(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero weights in place; returns the pruned mask."""
    scores = weight.abs().float()
    mask = nm_prune_mask(scores, *nm) if nm else unstructured_prune_mask(scores, sparsity)
    weight[mask] = 0
    return mask
