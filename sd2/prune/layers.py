"""Layer pruning: build a drafter from a model by keeping a subset of its decoder layers."""

from __future__ import annotations

import copy
import re

from sd2.errors import UserError

_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def parse_layer_list(spec: str, num_layers: int) -> list[int]:
    """'0-9,29' → [0..9, 29]; negative indices count from the end ('-1' is the last layer)."""
    out: list[int] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", part)
        if not m:
            raise UserError(f"--keep-layers: cannot read {part!r}; use a list like '0-9,29'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        lo, hi = (lo + num_layers if lo < 0 else lo), (hi + num_layers if hi < 0 else hi)
        if not (0 <= lo <= hi < num_layers):
            raise UserError(f"--keep-layers: {part!r} is outside 0-{num_layers - 1} (the model has {num_layers} layers)")
        out.extend(range(lo, hi + 1))
    if not out:
        raise UserError("--keep-layers: empty list")
    if len(set(out)) != len(out):
        raise UserError("--keep-layers: a layer is listed twice")
    return sorted(out)


def keep_layers(model, keep: list[int]):
    """A new model of the same class with only the `keep` decoder layers (weights copied, renumbered)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n = text_cfg.num_hidden_layers
    if any(i < 0 or i >= n for i in keep):
        raise UserError(f"--keep-layers: indices must be within 0-{n - 1}")
    text_cfg.num_hidden_layers = len(keep)
    if getattr(text_cfg, "layer_types", None):
        text_cfg.layer_types = [text_cfg.layer_types[i] for i in keep]
    remap = {old: new for new, old in enumerate(keep)}
    sd = {}
    for key, val in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            old = int(m.group(2))
            if old not in remap:
                continue
            key = f"{m.group(1)}{remap[old]}{m.group(3)}"
        sd[key] = val
    new = AutoModelForCausalLM.from_config(cfg, dtype=next(model.parameters()).dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head") and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"layer pruning mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()
