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
        from sd2.distill import load_distilled

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


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: list[list[int]]):
    """Run each sample once, recording layer 0's hidden states and every layer's call kwargs."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = []  # [sample][layer]
    current: list[dict] = []

    def pre_hook(idx):
        def fn(mod, args, kw):
            if idx == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())
            clean = {k: v for k, v in kw.items() if k != "hidden_states"}
            current.append(clean)
            if idx == len(layers) - 1:
                raise _Stop
        return fn

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in samples:
            current = []
            try:
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
            except _Stop:
                pass
            kwargs.append(current)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


def run_layer(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out
