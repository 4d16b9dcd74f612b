"""One-shot pruning of every decoder linear layer (sparsegpt, wanda, magnitude), sequentially calibrated."""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from sd2.config import METHODS  # defined once, beside the config that validates it
from sd2.errors import UserError
from sd2.progress import bar as progress_bar
from sd2.prune.allocate import check_allocation, layer_stats, outlier_ratios, owl_sparsities
from sd2.prune.calib import capture_layer_inputs, decoder_layers, walk_layers
from sd2.prune.magnitude import prune_magnitude
from sd2.prune.masks import check_nm_divides, check_sparsity, parse_pattern
from sd2.prune.sparsegpt import HessianStats, prune_sparsegpt
from sd2.prune.wanda import WandaStats, prune_wanda

DEFAULT_FILTER = r"(self_attn|mlp)\.\w+_proj$"


def matched_linears(model: nn.Module, layer_filter: str = DEFAULT_FILTER) -> dict[str, nn.Linear]:
    """Decoder linear layers whose name matches the filter (embeddings and lm_head are left dense)."""
    return {f"layers.{i}.{name}": mod for i, layer in enumerate(decoder_layers(model))
            for name, mod in _layer_linears(layer, layer_filter).items()}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")


def _layer_linears(layer: nn.Module, layer_filter: str) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and re.search(layer_filter, n)}


def validate(model: nn.Module, method: str, sparsity: float, pattern: str, layer_filter: str = DEFAULT_FILTER,
             allocation: str = "uniform", owl_lambda: float = 0.08, owl_m: float = 5.0):
    """All bad-input checks before any work: returns (nm, linears)."""
    _check_method(method)
    check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    check_allocation(allocation, method, nm, owl_lambda, owl_m)
    lins = matched_linears(model, layer_filter)
    if not lins:
        raise UserError(f"--filter {layer_filter!r}: matches no linear layer of the model's decoder")
    check_nm_divides(lins, nm)
    return nm, lins


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float, pattern: str = "unstructured",
                samples: list[list[int]] | None = None, layer_filter: str = DEFAULT_FILTER,
                progress: bool = True, blocksize: int = 128, percdamp: float = 0.01,
                device: str | torch.device | None = None, allocation: str = "uniform", owl_lambda: float = 0.08,
                owl_m: float = 5.0) -> dict:
    """Prune in place. Calibrated methods walk the layers in order, each fed by the pruned layers before it.

    With `device` (e.g. a GPU) only the layer being pruned, its statistics and the calibration activations
    live there: the model stays where it was loaded, so memory is one layer plus its Hessians (SparseGPT's
    sequential scheme). `allocation="owl"` first gives each layer its own sparsity (sd2.prune.allocate)."""
    nm, _ = validate(model, method, sparsity, pattern, layer_filter, allocation, owl_lambda, owl_m)
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    if method == "magnitude":
        linears = matched_linears(model, layer_filter).values()
        for lin in progress_bar(linears, progress=progress, desc="prune magnitude", unit="linear"):
            w = lin.weight.data if device is None else lin.weight.data.to(device)
            prune_magnitude(w, sparsity, nm)
            if w is not lin.weight.data:
                lin.weight.data.copy_(w.to(lin.weight.device))
        return {"method": method, "seconds": time.perf_counter() - t0}
    if not samples:
        raise UserError(f"--calib: {method} needs calibration samples")
    hidden, kwargs = capture_layer_inputs(model, samples)
    dev_opt = torch.device(device) if device is not None else None
    per_layer = [sparsity] * len(layers)
    if allocation == "owl":
        ratios = outlier_ratios(model, hidden, kwargs, lambda lay: _layer_linears(lay, layer_filter), owl_m, dev_opt)
        sizes = [sum(m.weight.numel() for m in _layer_linears(lay, layer_filter).values()) for lay in layers]
        per_layer = owl_sparsities(ratios, sizes, sparsity, owl_lambda)
    for li, layer, inputs, kws in progress_bar(walk_layers(model, hidden, kwargs, dev_opt), total=len(layers),
                                               progress=progress, desc=f"prune {method}", unit="layer"):
        _prune_layer(layer, inputs, kws, method, per_layer[li], nm, layer_filter, blocksize, percdamp)
    return {"method": method, "seconds": time.perf_counter() - t0, "layer_sparsity": [round(s, 4) for s in per_layer]}


def _prune_layer(layer: nn.Module, hidden: list[torch.Tensor], kws: list[dict], method: str, sparsity: float,
                 nm, layer_filter: str, blocksize: int, percdamp: float) -> None:
    """Collect the layer's input statistics over the calibration samples, then prune its linears."""
    lins = _layer_linears(layer, layer_filter)
    stats = layer_stats(layer, lins, hidden, kws, HessianStats if method == "sparsegpt" else WandaStats)
    for n, m in lins.items():
        if method == "sparsegpt":
            prune_sparsegpt(m.weight.data, stats[n], sparsity, nm, blocksize=blocksize, percdamp=percdamp)
        else:
            prune_wanda(m.weight.data, stats[n], sparsity, nm)


def prune_to_dir(model_spec: str, method: str, out, *, sparsity: float | None = None, pattern: str = "unstructured",
                 calib=None, calib_samples: int = 32, seq_len: int = 256, layer_filter: str = DEFAULT_FILTER,
                 seed: int = 0, threads: int | None = None, overwrite: bool = False, progress: bool = True,
                 device: str = "auto", dtype: str = "auto", allocation: str = "uniform", owl_lambda: float = 0.08,
                 owl_m: float = 5.0) -> dict:
    """`sd2 prune`: validate everything, prune, write the model dir + sparsity.json atomically; returns the report.
    The model is loaded on the CPU in `dtype`; on a GPU each layer visits it in turn (see prune_model)."""
    import json

    from sd2 import device as devices
    from sd2.device import torch_threads
    from sd2.models import check_output_dir, load_model, save_model
    from sd2.prune.calib import calibration_ids
    from sd2.prune.masks import sparsity_report

    nm = parse_pattern(pattern)
    if sparsity is None:
        if nm is None:
            raise UserError("--sparsity: required for unstructured pruning")
        sparsity = 1 - nm[0] / nm[1]
    check_sparsity(sparsity)
    if calib_samples < 1:
        raise UserError("--calib-samples: must be >= 1")
    _check_method(method)  # before loading the model: bad input fails fast
    check_allocation(allocation, method, nm, owl_lambda, owl_m)
    where = devices.plan(device, dtype, devices.visible_gpus())  # one layer at a time: no model-size check
    check_output_dir(out, overwrite)
    model, tok = load_model(model_spec, placement=devices.Placement("cpu", where.dtype))
    owl = dict(allocation=allocation, owl_lambda=owl_lambda, owl_m=owl_m)
    validate(model, method, sparsity, pattern, layer_filter, **owl)
    samples = calibration_ids(calib, tok, calib_samples, seq_len, seed) if method != "magnitude" else None
    with torch_threads(threads):
        info = prune_model(model, method, sparsity, pattern, samples, layer_filter, progress=progress,
                           device=where.device if where.is_cuda else None, **owl)
    report = sparsity_report(model, layer_filter)
    meta = {"source": str(model_spec), "method": method, "pattern": pattern, "requested_sparsity": sparsity,
            "calib": str(calib) if calib else None, "calib_samples": calib_samples if samples else 0,
            "seconds": round(info["seconds"], 2), "device": where.describe(), "allocation": allocation,
            **({"owl_lambda": owl_lambda, "owl_m": owl_m, "layer_sparsity": info["layer_sparsity"]}
               if allocation == "owl" else {}), **report}
    save_model(model, tok, out, overwrite=overwrite, extra_files={"sparsity.json": json.dumps(meta, indent=2)})
    return meta
