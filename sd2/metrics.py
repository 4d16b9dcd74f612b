"""Metric definitions used everywhere (docs/architecture.md): MAL, acceptance, MACs counting nonzeros, speedups, CIs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sd2.specdec import DecodeResult


def mal(results: Sequence[DecodeResult]) -> float:
    """Mean accepted length: tokens emitted / target verification passes (bonus token counted)."""
    passes = sum(r.target_passes for r in results)
    return sum(len(r.tokens) for r in results) / passes if passes else float("nan")


def acceptance_rate(results: Sequence[DecodeResult]) -> float:
    """Accepted draft tokens / drafted tokens."""
    drafted = sum(s.drafted for r in results for s in r.steps)
    return sum(s.accepted for r in results for s in r.steps) / drafted if drafted else float("nan")


def per_position_acceptance(results: Sequence[DecodeResult], gamma: int) -> list[float]:
    """For i in 1..γ: share of steps that drafted an i-th token whose i-th token was accepted."""
    out = []
    for i in range(gamma):
        drafted = [s for r in results for s in r.steps if s.drafted > i]
        out.append(sum(s.accepted > i for s in drafted) / len(drafted) if drafted else float("nan"))
    return out


def bootstrap_ci(results: Sequence[DecodeResult], n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of MAL, resampling prompts (ratio of sums within each resample)."""
    if not results:
        return [float("nan"), float("nan")]
    toks = np.array([len(r.tokens) for r in results], dtype=float)
    passes = np.array([r.target_passes for r in results], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(results), size=(n_boot, len(results)))
    boot = toks[idx].sum(1) / np.maximum(passes[idx].sum(1), 1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def linear_nonzeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{linear layer name: (nonzero weights, total weights)} for every nn.Linear, lm_head included."""
    seen: set[int] = set()
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            w = mod.weight.detach()
            out[name] = (int(torch.count_nonzero(w)), w.numel())
    return out


def macs_per_token(model: nn.Module, context: int = 256) -> dict[str, float]:
    """MACs to produce one token at `context`: nonzero linear weights + attention score/value MACs."""
    cfg = getattr(model.config, "text_config", None) or model.config
    nnz = linear_nonzeros(model)
    linear = sum(n for n, _ in nnz.values())
    dense = sum(t for _, t in nnz.values())
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    attn = 0
    for lt in layer_types[: cfg.num_hidden_layers]:
        ctx = min(context, window) if (lt == "sliding_attention" and window) else context
        attn += 2 * heads * head_dim * ctx  # q·K over ctx keys, then weights·V
    return {
        "macs_per_token": float(linear + attn),
        "linear_macs": float(linear),
        "attention_macs": float(attn),
        "dense_linear_macs": float(dense),
        "linear_density": linear / dense if dense else float("nan"),
        "context": context,
    }


def weight_bytes_per_token(model: nn.Module, elem_bytes: int, extra_head_rows: float = 0.0) -> dict[str, float]:
    """Bytes of linear weights one forward reads to make a token (lm_head included, as loaded: a compact head is its
    rows). Why: at batch 1 on a CPU a forward is bound by the bytes it reads, not its MACs. `dense`: what dense
    kernels read, zeros too; `nonzero`: what a sparse kernel would (each nonzero and a column index: 16-bit where
    a row is under 65,536 wide, else 32-bit). `extra_head_rows`: rows a prompt adds to a compact head."""
    dense = nonzero = 0.0
    mods = dict(model.named_modules())
    for name, (nnz, total) in linear_nonzeros(model).items():
        index = 2 if mods[name].weight.shape[1] < 65536 else 4
        dense += total * elem_bytes
        nonzero += nnz * (elem_bytes + index)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if extra_head_rows and head is not None:
        width = head.weight.shape[1]
        dense += extra_head_rows * width * elem_bytes
        nonzero += extra_head_rows * width * (elem_bytes + 2)
    return {"dense": dense, "nonzero": nonzero}


def theoretical_speedup(mal_value: float, gamma: int, cost_ratio: float) -> float:
    """MAL / (γ·c + 1): expected speedup when a drafter step costs c target steps and verification costs one."""
    return mal_value / (gamma * cost_ratio + 1)


def predicted_speedup(mal_value: float, gamma: int, drafter_time_ratio: float, verify_cost_ratio: float) -> float:
    """MAL / (γ·drafter_time_ratio + v): the same model with measured times instead of MACs — a drafter forward
    costs drafter_time_ratio target forwards, and verifying γ+1 tokens costs v one-token forwards."""
    return mal_value / (gamma * drafter_time_ratio + verify_cost_ratio)
