"""One-shot pruning of every decoder linear layer (sparsegpt, wanda, magnitude), sequentially calibrated."""

from __future__ import annotations

import re
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from sd2.errors import UserError
from sd2.prune.calib import capture_layer_inputs, decoder_layers, run_layer
from sd2.prune.magnitude import prune_magnitude
from sd2.prune.masks import check_nm_divides, check_sparsity, parse_pattern
from sd2.prune.sparsegpt import HessianStats, prune_sparsegpt
from sd2.prune.wanda import WandaStats, prune_wanda

METHODS = ("sparsegpt", "wanda", "magnitude")
DEFAULT_FILTER = r"(self_attn|mlp)\.\w+_proj$"


def matched_linears(model: nn.Module, layer_filter: str = DEFAULT_FILTER) -> dict[str, nn.Linear]:
    """Decoder linear layers whose name matches the filter (embeddings and lm_head are left dense)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and re.search(layer_filter, name):
                out[f"layers.{i}.{name}"] = mod
    return out


def validate(model: nn.Module, method: str, sparsity: float, pattern: str, layer_filter: str = DEFAULT_FILTER):
    """All bad-input checks before any work: returns (nm, linears)."""
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    lins = matched_linears(model, layer_filter)
    if not lins:
        raise UserError(f"--filter {layer_filter!r}: matches no linear layer of the model's decoder")
    check_nm_divides(lins, nm)
    return nm, lins


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float, pattern: str = "unstructured",
                samples: list[list[int]] | None = None, layer_filter: str = DEFAULT_FILTER,
                progress: bool = True, blocksize: int = 128, percdamp: float = 0.01) -> dict:
    """Prune in place. Calibrated methods walk the layers in order, each fed by the pruned layers before it."""
    nm, _ = validate(model, method, sparsity, pattern, layer_filter)
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    if method == "magnitude":
        for lin in tqdm(matched_linears(model, layer_filter).values(), desc="prune magnitude", disable=not progress):
            prune_magnitude(lin.weight.data, sparsity, nm)
        return {"method": method, "seconds": time.perf_counter() - t0}
    if not samples:
        raise UserError(f"--calib: {method} needs calibration samples")
    hidden, kwargs = capture_layer_inputs(model, samples)
    for li, layer in enumerate(tqdm(layers, desc=f"prune {method}", unit="layer", disable=not progress)):
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and re.search(layer_filter, n)}
        stats = {n: (HessianStats if method == "sparsegpt" else WandaStats)(m.in_features) for n, m in lins.items()}
        handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.add(inp[0]))
                   for n, m in lins.items()]
        try:
            for h, kw in zip(hidden, kwargs):
                run_layer(layer, h, kw[li])
        finally:
            for hd in handles:
                hd.remove()
        for n, m in lins.items():
            if method == "sparsegpt":
                prune_sparsegpt(m.weight.data, stats[n], sparsity, nm, blocksize=blocksize, percdamp=percdamp)
            else:
                prune_wanda(m.weight.data, stats[n], sparsity, nm)
        hidden = [run_layer(layer, h, kw[li]) for h, kw in zip(hidden, kwargs)]  # outputs of the pruned layer
    return {"method": method, "seconds": time.perf_counter() - t0}
