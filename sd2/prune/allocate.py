"""Per-layer sparsity from activation outliers (OWL, Yin et al., 2024): a layer whose Wanda scores hold more
outliers keeps more of its weights. The parameter-weighted mean stays the requested sparsity, so the drafter's
nonzeros (its MACs) are those of uniform pruning; only where they sit changes."""

from __future__ import annotations

import torch
from torch import nn

from sd2.errors import UserError
from sd2.prune.calib import run_layer, walk_layers
from sd2.prune.wanda import WandaStats

ALLOCATIONS = ("uniform", "owl")


def layer_stats(layer: nn.Module, lins: dict[str, nn.Linear], hidden: list[torch.Tensor], kws: list[dict],
                cls=WandaStats) -> dict:
    """Input statistics of each linear of one decoder layer over the calibration samples (one forward each)."""
    stats = {n: cls(m.in_features, m.weight.device) for n, m in lins.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.add(inp[0])) for n, m in lins.items()]
    try:
        for h, kw in zip(hidden, kws):
            run_layer(layer, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    return stats


def outlier_ratio(lins: dict[str, nn.Linear], stats: dict, m: float) -> float:
    """Share of the layer's Wanda scores |W|·||X|| above m times their mean (OWL's layerwise outlier density)."""
    hits = total = 0
    for n, lin in lins.items():
        s = lin.weight.detach().abs().float() * stats[n].sq.sqrt().float().to(lin.weight.device).unsqueeze(0)
        hits += int((s > m * s.mean()).sum())
        total += s.numel()
    return hits / max(total, 1)


@torch.no_grad()
def outlier_ratios(model: nn.Module, hidden: list[torch.Tensor], kwargs: list[list[dict]],
                   lins_of, m: float, device: torch.device | None = None) -> list[float]:
    """One dense pass over the decoder (the model is not changed): each layer's outlier ratio."""
    out = []
    for _, layer, inputs, kws in walk_layers(model, hidden, kwargs, device):
        lins = lins_of(layer)
        out.append(outlier_ratio(lins, layer_stats(layer, lins, inputs, kws), m))
    return out


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """Map outlier ratios linearly onto densities spanning 2·lam, shifted so the size-weighted mean sparsity is
    `sparsity`: the most outlier-rich layer is pruned least."""
    lo, hi = min(ratios), max(ratios)
    spread = [(r - lo) / (hi - lo) * 2 * lam if hi > lo else 0.0 for r in ratios]
    mean = sum(s * n for s, n in zip(spread, sizes)) / sum(sizes)
    out = [sparsity - (s - mean) for s in spread]
    if min(out) <= 0 or max(out) >= 1:
        raise UserError(f"--owl-lambda {lam}: layer sparsities would leave (0, 1) around {sparsity}; use a smaller "
                        "lambda")
    return out


def check_allocation(allocation: str, method: str, nm, lam: float, m: float) -> None:
    if allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if allocation == "owl" and nm is not None:
        raise UserError("--allocation owl: N:M patterns fix every layer's sparsity; use --allocation uniform")
    if allocation == "owl" and method == "magnitude":
        raise UserError("--allocation owl: needs calibration activations; use --method sparsegpt or wanda")
    if not 0 <= lam < 0.5:
        raise UserError(f"--owl-lambda {lam}: must be in [0, 0.5)")
    if m <= 0:
        raise UserError(f"--owl-m {m}: must be > 0")
