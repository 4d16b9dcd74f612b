"""Calibration data and sequential layer-by-layer propagation.

Each decoder layer sees the outputs of the already-pruned layers before it (as in SparseGPT/Wanda): we
record every layer's call kwargs (masks, rotary embeddings — they differ per layer type in e.g. Gemma 3)
in one pass, then replay layers one at a time on our own hidden states.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from sd2.data import encode_prompt, read_prompts
from sd2.errors import UserError


def calibration_ids(source: str | Path | None, tok, n_samples: int = 32, seq_len: int = 256,
                    seed: int = 0) -> list[list[int]]:
    """Token ids of calibration samples: a distilled dataset dir (prompt + response) or a prompts file."""
    if source is None:
        raise UserError("--calib: required for this method (a distilled dataset dir or a prompts JSONL file)")
    path = Path(source)
    if path.is_dir():
        from sd2.data import load_distilled

        ds = load_distilled(path)
        texts = [(r["prompt"], r["response"]) for r in ds]
    elif path.is_file():
        texts = [(p.text, p.reference or "") for p in read_prompts(path)]
    else:
        raise UserError(f"--calib {source}: no such file or directory")
    if len(texts) < n_samples:
        raise UserError(f"--calib {source}: has {len(texts)} samples, fewer than --calib-samples {n_samples}")
    rng = random.Random(seed)
    picked = rng.sample(texts, n_samples)
    out = []
    for prompt, response in picked:
        ids = encode_prompt(tok, prompt) + (tok.encode(response, add_special_tokens=False) if response else [])
        out.append(ids[:seq_len])
    return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError("model: no decoder layers found (expected model.model.layers)")
    return layers


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its call and passes the hidden states through, so
    capturing costs one embedding pass and no layer is computed (nor placed on a device) before its turn."""

    def __init__(self, idx: int, last: bool, sink: list, first_inputs: list):
        super().__init__()
        self.idx, self.last, self.sink, self.first_inputs = idx, last, sink, first_inputs

    def forward(self, *args, **kw):
        h = args[0] if args else kw.pop("hidden_states")
        if self.idx == 0:
            self.first_inputs.append(h.detach())
        self.sink.append({k: v for k, v in kw.items() if k != "hidden_states"})
        if self.last:
            raise _Stop
        return h


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: list[list[int]]):
    """Run each sample through the embeddings once, recording layer 0's hidden states and every layer's call
    kwargs (masks, rotary embeddings — they differ per layer type in e.g. Gemma 3)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []  # [sample][layer]
    originals = list(layers)
    current: list[dict] = []
    recorders = [_Recorder(i, i == len(layers) - 1, current, hidden) for i in range(len(layers))]
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        emb = model.get_input_embeddings()
        dev = emb.weight.device
        for ids in samples:
            current.clear()
            try:
                model(input_ids=torch.tensor([ids], device=dev), use_cache=False)
            except _Stop:
                pass
            kwargs.append(list(current))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, kwargs


def to_device(obj, device):
    """Tensors inside nested tuples/lists/dicts moved to `device` (layer call kwargs)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def walk_layers(model: nn.Module, hidden: list[torch.Tensor], kwargs: list[list[dict]],
                device: torch.device | None = None):
    """Yield (index, layer, its inputs, its call kwargs) in order, the layer on `device` (default: where it is)
    while the caller works on it; the next layer's inputs are this layer's outputs *after* that work (SparseGPT's
    sequential scheme: each layer calibrated on what the already-pruned layers before it produce)."""
    for li, layer in enumerate(decoder_layers(model)):
        home = next(layer.parameters()).device
        dev = device or home
        layer.to(dev)
        hidden = [h.to(dev) for h in hidden]
        kws = [to_device(kw[li], dev) for kw in kwargs]
        yield li, layer, hidden, kws
        hidden = [run_layer(layer, h, kw) for h, kw in zip(hidden, kws)]
        layer.to(home)
