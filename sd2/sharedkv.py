"""Drafters that read the target's KV cache (a pruned copy of the target: same layers, heads and rotary).

Why: a sparse drafter as deep as the target drafts each token from its own keys and values of the whole context,
each computed with 70% of the weights gone, so its errors compound over the context. The target's keys and values
of every committed token are exact and already computed — verification writes them — so the drafter attends to
those and computes its own only for the token it starts from and its drafts, in the same cache rows the target's
next verification overwrites. No extra MACs, no drafter KV cache, and the target still verifies every token
(lossless by construction).

A layer slice of the target (its first layers and its last, sd2.prune.layers) reads the caches of the layers it
was cut from: drafter layer j reads target layer `kv_layers[j]` (`sd2_kv_layers` in its config), so its top
layers attend to the target's own top-layer keys and values of the whole context — what a shallow drafter cannot
compute — while its MACs and time stay a slice's.

Training matches it: position i of a training block attends to the target's keys and values of positions < i and
to its own at i (`attention`, registered as an HF attention implementation; the target's K/V come from one
no-grad target pass per step, `target_kv`). A drafter trained so carries `sd2_shared_kv` in its config, and sd2's
engine reads the target's cache with it by default; plain transformers loads it as the Llama model it is (as HF's
`assistant_model` it drafts from its own cache, with a lower acceptance).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from sd2.errors import UserError

MARK = "sd2_shared_kv"
LAYERS = "sd2_kv_layers"  # drafter layer j reads the target's layer LAYERS[j] (absent: layer j)
IMPL = "sd2_shared_kv"  # the HF attention implementation used while training


def shares_kv(model) -> bool:
    """Whether `model` was trained to read the target's KV cache (its config carries the mark)."""
    return bool(getattr(getattr(model, "config", None), MARK, False))


def mark(model, layers: list[int] | None = None) -> None:
    """Mark the drafter as trained over the target's cache; `layers`: the target layer each of its layers reads."""
    setattr(model.config, MARK, True)
    if layers is not None and list(layers) != list(range(len(layers))):
        setattr(model.config, LAYERS, [int(i) for i in layers])


def kv_layers(config, kept: list[int] | None = None) -> list[int]:
    """The target layer whose cache each drafter layer reads: the map the drafter carries, else the layers it was
    cut from (`kept`, from its sd2_layers.json), else layer j for layer j."""
    layers = _layer_map(config, kept)
    return layers if layers is not None else list(range(_attention_shape(config)["layers"]))


def _layer_map(config, kept: list[int] | None) -> list[int] | None:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(c, LAYERS, None) or getattr(config, LAYERS, None) or kept
    return [int(i) for i in layers] if layers else None


def kept_layers(model_dir, target_layers: int) -> list[int] | None:
    """The target layers a layer-sliced drafter was cut from (sd2_layers.json beside its weights), if it was cut
    from a model as deep as the target (a slice of a slice numbers another model's layers: no map)."""
    import json
    from pathlib import Path

    f = Path(str(model_dir)) / "sd2_layers.json"
    info = json.loads(f.read_text()) if f.is_file() else {}
    return info.get("kept_layers") if info.get("source_layers") == target_layers else None


def _attention_shape(config) -> dict:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"layers": c.num_hidden_layers, "key_value_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "rotary": getattr(c, "rope_parameters", None) or getattr(c, "rope_theta", None),
            "model_type": c.model_type}


def check_pair(target_config, drafter_config, flag: str = "--shared-kv", kept: list[int] | None = None) -> None:
    """Drafter layer j reads the target's layer kv_layers[j] cache: both need the same KV heads, head size and
    rotary embedding, and each drafter layer a target layer to read (a pruned copy of the target or a slice of its
    layers has them; another family does not)."""
    t, d = _attention_shape(target_config), _attention_shape(drafter_config)
    bad = [f"{k} {d[k]} vs the target's {t[k]}" for k in t if k != "layers" and t[k] != d[k]]
    layers = _layer_map(drafter_config, kept)
    if layers is None and d["layers"] != t["layers"]:
        bad.append(f"layers {d['layers']} vs the target's {t['layers']}, and no map of the target layers it was cut "
                   "from (the sd2_layers.json sd2 writes beside a layer slice)")
    elif layers is not None and (len(layers) != d["layers"] or not all(0 <= i < t["layers"] for i in layers)):
        bad.append(f"its {d['layers']} layers map onto target layers {layers}, not {d['layers']} of the target's "
                   f"{t['layers']}")
    if bad:
        raise UserError(f"{flag}: the drafter cannot read the target's KV cache ({'; '.join(bad)}); it must be a "
                        "pruned copy or a layer slice of the target, or pass --shared-kv off")


def slice_can_read(target_spec: str, drafter_dir, allow_pickle: bool = False) -> bool:
    """Whether a drafter (e.g. a layer-pruned baseline) could be trained to read the target's KV cache: a pruned copy
    of the target, or a slice cut from a model as deep as it (its sd2_layers.json maps each layer onto the target's);
    a slice of a slice cannot. Decided on the configs alone, before any training."""
    from transformers import AutoConfig

    from sd2.models import resolve_spec

    target = AutoConfig.from_pretrained(resolve_spec(target_spec, allow_pickle))
    drafter = AutoConfig.from_pretrained(str(drafter_dir))
    kept = kept_layers(drafter_dir, _attention_shape(target)["layers"])
    try:
        check_pair(target, drafter, kept=kept)
    except UserError:
        return False
    return True


def round_starts(t: int, rounds: int, offset: int, device=None) -> torch.Tensor:
    """Where the draft round of each of t positions starts: every position its own round (rounds 1), or rounds of
    `rounds` positions from `offset` (the first, shorter one from 0)."""
    i = torch.arange(t, device=device)
    if rounds <= 1:
        return i
    return (torch.div(i - offset, rounds, rounding_mode="floor") * rounds + offset).clamp(min=0)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, scaling: float,
              dropout: float = 0.0, **kwargs):
    """Causal attention as the drafter sees it in a draft round starting at s(i): position i reads the target's
    keys/values (`sd2_target_kv`, per layer) of positions < s(i) and its own of s(i)..i — the token the round
    starts from and the drafts before i (`sd2_rounds` positions per round from `sd2_offset`; 1 = every position
    the first draft of its round). query [B, H, T, d], key/value [B, H_kv, T, d] (after rotary); right padding
    needs no mask (padded keys follow every real query)."""
    kt, vt = kwargs["sd2_target_kv"][getattr(module, "sd2_kv_layer", module.layer_idx)]
    b, h, t, hd = query.shape
    nk = key.shape[1]
    q = query.view(b, nk, h // nk, t, hd)
    start = round_starts(t, kwargs.get("sd2_rounds", 1), kwargs.get("sd2_offset", 0), q.device)
    j = torch.arange(t, device=q.device)[None]
    before = j < start[:, None]  # [t, t]: the target's keys
    mine = (j >= start[:, None]) & (j <= j.T)  # the drafter's own: from the round's start to itself
    past = torch.einsum("bkgtd,bksd->bkgts", q, kt.to(q.dtype)).masked_fill(~before, float("-inf"))
    own = torch.einsum("bkgtd,bksd->bkgts", q, key).masked_fill(~mine, float("-inf"))
    w = torch.softmax(torch.cat([past, own], -1) * scaling, -1)
    out = torch.einsum("bkgts,bksd->bkgtd", w[..., :t], vt.to(q.dtype)) + \
        torch.einsum("bkgts,bksd->bkgtd", w[..., t:], value)
    return out.reshape(b, h, t, hd).transpose(1, 2), None


def use_for_training(model, layers: list[int] | None = None) -> None:
    """Switch the drafter's attention to `attention` (it then needs `sd2_target_kv=` on every forward); its layer j
    reads the target's layer `layers[j]` (default j)."""
    from transformers import AttentionInterface

    from sd2.prune.calib import decoder_layers

    AttentionInterface.register(IMPL, attention)
    model.set_attn_implementation(IMPL)
    for j, layer in enumerate(decoder_layers(model)):
        layer.self_attn.sd2_kv_layer = layers[j] if layers is not None else j


@contextmanager
def reading_target_layers(model):
    """HF modules: while drafting over the target's cache, each drafter attention writes and reads the target's
    layer it maps to (HF's cache is indexed by the module's `layer_idx`); restored after."""
    from sd2.prune.calib import decoder_layers

    layers = kv_layers(model.config)
    attns = [layer.self_attn for layer in decoder_layers(model)]
    old = [a.layer_idx for a in attns]
    try:
        for a, i in zip(attns, layers):
            a.layer_idx = i
        yield
    finally:
        for a, i in zip(attns, old):
            a.layer_idx = i


@torch.no_grad()
def target_kv(target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits: bool = True
              ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """The target's keys and values (after rotary) of every layer over a training block, and its logits if asked
    (without them only its body runs: the head is a fifth of its MACs)."""
    run = target if logits else target.model
    out = run(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = getattr(out, "past_key_values", None) or out.cache
    return [(layer.keys, layer.values) for layer in cache.layers], (out.logits if logits else None)
