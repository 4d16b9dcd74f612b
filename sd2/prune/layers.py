"""Layer pruning: build a drafter from a model by keeping a subset of its decoder layers."""

from __future__ import annotations

import copy
import re

from sd2 import draftvocab, sharedkv
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
            raise UserError(f"--keep-layers: {part!r} is outside 0-{num_layers - 1} "
                            f"(the model has {num_layers} layers)")
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
    for c in {id(cfg): cfg, id(text_cfg): text_cfg}.values():  # a shared-KV drafter's map follows its layers
        if getattr(c, sharedkv.LAYERS, None):
            setattr(c, sharedkv.LAYERS, [getattr(c, sharedkv.LAYERS)[i] for i in keep])
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
    if draftvocab.draft_ids(model) is not None:  # a compact draft head: the same rows (and map) in the new model
        draftvocab.compact_head(new, draftvocab.draft_ids(model).tolist())
    missing, unexpected = new.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head") and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"layer pruning mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


_keep = keep_layers  # layer_prune_to_dir's `keep_layers` argument shadows the function


def layer_block_distances(model, samples: list[list[int]], n_drop: int) -> list[float]:
    """Mean angular distance arccos(cos(h_l, h_{l+n}))/π between the input of layer l and the output of layer
    l+n−1, over all calibration tokens, for every start l (Gromov et al., 2024)."""
    import torch

    from sd2.prune.calib import decoder_layers

    layers = decoder_layers(model)
    L = len(layers)
    sums = [0.0] * (L - n_drop + 1)
    count = 0
    states: list = []
    hooks = [layers[0].register_forward_pre_hook(
        lambda m, a, kw: states.append((a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)]
    for layer in layers:
        hooks.append(layer.register_forward_hook(
            lambda m, a, out: states.append((out[0] if isinstance(out, tuple) else out).detach())))
    try:
        with torch.no_grad():
            for ids in samples:
                states.clear()
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
                hs = [s[0].float() for s in states]  # L+1 tensors [T, d]
                for start in range(L - n_drop + 1):
                    a, b = hs[start], hs[start + n_drop]
                    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
                    sums[start] += float(torch.arccos(cos).sum() / torch.pi)
                count += hs[0].shape[0]
    finally:
        for h in hooks:
            h.remove()
    return [s / count for s in sums]


def choose_layers(model, num_layers: int, strategy: str, samples: list[list[int]] | None = None) -> list[int]:
    """Indices to keep so that `num_layers` remain. `first`: the first num_layers−1 layers and the last one.
    `angular`: drop the contiguous block whose input and output are closest in angle."""
    cfg = getattr(model.config, "text_config", None) or model.config
    L = cfg.num_hidden_layers
    if not 1 <= num_layers < L:
        raise UserError(f"--num-layers {num_layers}: must be between 1 and {L - 1} (the model has {L} layers)")
    if strategy == "first":
        return list(range(num_layers - 1)) + [L - 1] if num_layers > 1 else [L - 1]
    if strategy == "angular":
        if not samples:
            raise UserError("--strategy angular: needs --calib (a distilled dataset dir or prompts file)")
        n_drop = L - num_layers
        d = layer_block_distances(model, samples, n_drop)
        start = min(range(len(d)), key=d.__getitem__)
        return [i for i in range(L) if not start <= i < start + n_drop]
    raise UserError(f"--strategy {strategy!r}: use angular or first")


def layers_for_macs(model, target_macs: float, context: int = 256) -> int:
    """The number of kept layers whose MACs per token come closest to `target_macs` (layers are uniform)."""
    from sd2.metrics import macs_per_token

    cfg = getattr(model.config, "text_config", None) or model.config
    L = cfg.num_hidden_layers
    full = macs_per_token(model, context)["macs_per_token"]
    one = macs_per_token(keep_layers(model, [0]), context)["macs_per_token"]
    per_layer = (full - one) / (L - 1)
    base = one - per_layer
    best = min(range(1, L), key=lambda k: abs(base + k * per_layer - target_macs))
    return best


def layer_prune_to_dir(model_spec: str, out, *, keep_layers: str | None = None, num_layers: int | None = None,
                       strategy: str = "angular", match_macs: str | None = None, calib=None, calib_samples: int = 16,
                       seq_len: int = 256, context: int = 256, seed: int = 0, overwrite: bool = False,
                       device: str = "auto", dtype: str = "auto") -> dict:
    """`sd2 layer-prune`: an explicit list, or K layers by strategy (K optionally matched on MACs to a model).
    Angular distances are measured on `device`; the pruned model is built and saved in `dtype`."""
    import json

    from sd2 import device as devices

    from sd2.metrics import macs_per_token
    from sd2.models import check_output_dir, load_model, save_model
    from sd2.prune.calib import calibration_ids

    if sum(x is not None for x in (keep_layers, num_layers, match_macs)) != 1:
        raise UserError("give exactly one of --keep-layers, --num-layers, --match-macs")
    if strategy not in ("angular", "first"):
        raise UserError(f"--strategy {strategy!r}: use angular or first")
    where = devices.plan(device, dtype, devices.visible_gpus())
    check_output_dir(out, overwrite)
    m, tok = load_model(model_spec, placement=devices.Placement("cpu", where.dtype))
    L = m.config.num_hidden_layers
    info: dict = {"source": str(model_spec), "source_layers": L}
    if keep_layers is not None:
        keep = parse_layer_list(keep_layers, L)
    else:
        if match_macs is not None:
            ref, _ = load_model(match_macs, with_tokenizer=False)
            ref_macs = macs_per_token(ref, context)["macs_per_token"]
            num_layers = layers_for_macs(m, ref_macs, context)
            info.update(match_macs=str(match_macs), reference_macs_per_token=ref_macs)
        samples = calibration_ids(calib, tok, calib_samples, seq_len, seed) if strategy == "angular" else None
        if samples and where.is_cuda:
            m.to(where.device)
        keep = choose_layers(m, num_layers, strategy, samples)
        m.to("cpu")
        info["strategy"] = strategy
    pruned = _keep(m, keep)
    info.update(kept_layers=keep, macs_per_token=macs_per_token(pruned, context)["macs_per_token"])
    save_model(pruned, tok, out, overwrite=overwrite, extra_files={"sd2_layers.json": json.dumps(info, indent=2)})
    return info

