"""Feature drafters (EAGLE, Li et al. 2024): one decoder layer that drafts from the target's own last hidden
states instead of from tokens alone.

Why: a drafter cut from the target's layers has to relearn, from a few hundred thousand tokens, what the dropped
layers computed; at this scale it stalls near MAL 1.4. The target's final hidden state already holds what it
will say next, and verification computes it for every accepted token anyway, so a drafter that reads it needs
one layer: input at position j is fc([embed(x_{j+1}); f_j]) (the token the target emitted after position j, and
the target's feature there); the layer's normed output f̂_{j+1} goes through the (compact) head to draft x_{j+2},
and is the feature the next draft step reads when the target's own is not known yet.

On disk a feature drafter is a one-layer Llama model dir whose config carries `sd2_feature_drafter` and whose
weights include `eagle_fc`; plain transformers loads it as a Llama model (the fc is then unused), so it runs in
sd2's engine, not as HF's `assistant_model`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from sd2.errors import UserError

MARK = "sd2_feature_drafter"


class FeatureDrafter(LlamaForCausalLM):
    """A one-layer Llama plus `eagle_fc`, which mixes the next token's embedding with the target's feature."""

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden_size
        self.eagle_fc = nn.Linear(2 * h, h, bias=False)
        k = len(feature_layers(config))
        if k > 1:  # several target layers (EAGLE-3): their features are reduced to one hidden-size vector
            self.eagle_reduce = nn.Linear(k * h, h, bias=False)

    def inputs(self, input_ids: torch.Tensor, feats: torch.Tensor | None, own: torch.Tensor | None = None
               ) -> torch.Tensor:
        """fc([embed(ids); feats]); the target's multi-layer features are reduced first (the drafter's own
        features, `own`, for the last positions, are already hidden-size); missing features (a cost probe, a plain
        forward) read as zeros."""
        emb = self.model.embed_tokens(input_ids)
        n_own = 0 if own is None else own.shape[1]
        feats = torch.zeros_like(emb[:, : emb.shape[1] - n_own]) if feats is None else feats.to(emb.dtype)
        if feats.shape[-1] != emb.shape[-1]:
            feats = self.eagle_reduce(feats)
        if own is not None:
            feats = torch.cat([feats, own.to(emb.dtype)], 1)
        return self.eagle_fc(torch.cat([emb, feats], -1))

    def forward(self, input_ids=None, feats=None, attention_mask=None, own=None, **kwargs):
        """With `feats`: the drafter's own forward, logits plus its normed features as `hidden_states[0]`;
        without: a plain Llama forward over zero features (HF utilities that call the model stay usable)."""
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        keep = kwargs.pop("logits_to_keep", 0)
        out = self.model(inputs_embeds=self.inputs(input_ids, feats, own), attention_mask=attention_mask, **kwargs)
        h = out.last_hidden_state
        logits = self.lm_head(h[:, -keep:] if keep else h)
        return CausalLMOutputWithPast(logits=logits, hidden_states=(h,))


def feature_layers(config) -> tuple[int, ...]:
    """Which target layers a feature drafter reads: -1 = the final normed hidden state (what the head reads),
    i >= 0 = the output of decoder layer i, RMS-normalised."""
    return tuple((getattr(config, MARK, None) or {}).get("feature_layers", (-1,)))


def is_feature_drafter(model) -> bool:
    return isinstance(model, FeatureDrafter) or hasattr(model, "eagle_fc")


def check_target(target) -> None:
    """Feature drafters read a Llama-family target's final normed hidden state (what its lm_head reads)."""
    if getattr(target.config, "model_type", None) != "llama":
        raise UserError(f"feature drafter: the target is a {target.config.model_type} model; feature drafters are "
                        "built for Llama-family targets (use a layer-sliced drafter for this one)")


def build(target, layer: int = -1, n_layers: int = 1, reads: tuple[int, ...] = (-1,)) -> FeatureDrafter:
    """A feature drafter for `target`: its embeddings, final norm and head, `n_layers` decoder layers copied from
    the target's layers starting at `layer`, and fc = [s·I | I]: token embedding plus target feature, the embedding
    scaled by s = rms(feature) / rms(embedding) so that the token the drafter must read is not drowned (SmolLM2's
    normed features are ~17× larger than its embeddings)."""
    check_target(target)
    cfg = copy.deepcopy(target.config)
    n = cfg.num_hidden_layers
    if not -n <= layer < n:
        raise UserError(f"--feature-layer {layer}: the target has {n} layers; pick one in [{-n}, {n - 1}]")
    if not 1 <= n_layers <= n:
        raise UserError(f"--feature-layers {n_layers}: between 1 and the target's {n} layers")
    first = min(layer % n, n - n_layers)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n_layers]
    bad = [i for i in reads if i != -1 and not 0 <= i < n - 1]
    if bad:
        raise UserError(f"--feature-reads {bad[0]}: the target has {n} layers; read layers 0..{n - 2}, or -1 for "
                        "the final normed state")
    reads = tuple(sorted(set(reads), key=lambda i: (i == -1, i)))
    setattr(cfg, MARK, {"source_layers": list(range(first, first + n_layers)), "target_layers": n,
                        "feature_layers": list(reads)})
    cfg.tie_word_embeddings = False
    drafter = FeatureDrafter(cfg).to(dtype=next(target.parameters()).dtype)
    src = target.model
    with torch.no_grad():
        drafter.model.embed_tokens.weight.copy_(src.embed_tokens.weight)
        drafter.model.norm.weight.copy_(src.norm.weight)
        drafter.lm_head.weight.copy_(target.get_output_embeddings().weight)
        for i in range(n_layers):
            drafter.model.layers[i].load_state_dict(src.layers[first + i].state_dict())
        eye = torch.eye(cfg.hidden_size, dtype=drafter.eagle_fc.weight.dtype)
        scale = src.norm.weight.float().pow(2).mean().sqrt() / src.embed_tokens.weight.float().pow(2).mean().sqrt()
        drafter.eagle_fc.weight.copy_(torch.cat([eye * scale, eye], 1))
        if len(reads) > 1:  # starts as the final feature alone; training mixes in the others
            w = torch.zeros_like(drafter.eagle_reduce.weight)
            w[:, -cfg.hidden_size:] = eye
            drafter.eagle_reduce.weight.copy_(w)
    drafter.generation_config = copy.deepcopy(target.generation_config)
    return drafter.eval()


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def gather(layer_outputs: dict[int, torch.Tensor], final: torch.Tensor, reads: tuple[int, ...]) -> torch.Tensor:
    """The feature vector of `reads` from decoder-layer outputs (RMS-normalised) and the final normed state."""
    if reads == (-1,):
        return final
    return torch.cat([final if i == -1 else _unit_rms(layer_outputs[i]) for i in reads], -1)


@torch.no_grad()
def target_features(target, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    reads: tuple[int, ...] = (-1,), **kwargs) -> torch.Tensor:
    """The target's features [B, T, H·len(reads)] that a feature drafter reads (default: the final normed hidden
    state); `kwargs` go to the target's decoder (a KV cache)."""
    if reads == (-1,):
        return target.model(input_ids=ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    outs: dict[int, torch.Tensor] = {}
    hooks = [target.model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in reads if i != -1]
    try:
        final = target.model(input_ids=ids, attention_mask=attention_mask, **kwargs).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return gather(outs, final, reads)


def feature_loss(pred: torch.Tensor, feats: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the drafter's features and the target's (EAGLE's regression term) on selected positions."""
    if not bool(sel.any()):
        return pred.sum() * 0
    return F.smooth_l1_loss(pred[sel].float(), feats[sel].float())


def _cache_file(cache_dir: Path | None, target_digest: str | None, examples: list[dict],
                reads: tuple[int, ...], dtype: torch.dtype) -> Path | None:
    if cache_dir is None or not target_digest:
        return None
    h = hashlib.sha256(target_digest.encode())
    if reads != (-1,):
        h.update(json.dumps(list(reads)).encode())
    if dtype != torch.float32:
        h.update(str(dtype).encode())
    for e in examples:
        h.update(json.dumps(e["input_ids"]).encode())
    return Path(cache_dir) / f"{h.hexdigest()[:32]}.safetensors"


def fast_feature_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where it is fast (GPUs, CPUs with AVX-512 BF16: the target's feature pass runs 1.85× faster than fp32 on
    this Zen 4 core, bench in docs/drafter-recipe.md), else fp32."""
    from sd2.device import native_bf16

    return torch.bfloat16 if native_bf16(device) else torch.float32


@torch.no_grad()
def attach_features(target, examples: list[dict], batch_tokens: int = 8192, progress: bool = True,
                    cache_dir: Path | None = None, target_digest: str | None = None,
                    reads: tuple[int, ...] = (-1,)) -> None:
    """Give each example the target's features over its tokens (`feats`, fp16 [T, H]), computed once per
    example before packing (a packed block would let one example's features see another's tokens). With
    `cache_dir` and the target's digest, features are kept on disk by (target, tokens): another run on the same
    data (a variant, a resume) reads them instead of running the target again."""
    from safetensors.torch import load_file, save_file

    cached = _cache_file(cache_dir, target_digest, examples, reads, next(target.parameters()).dtype)
    if cached is not None and cached.is_file():
        flat = load_file(str(cached))["feats"]
        for e, part in zip(examples, flat.split([len(e["input_ids"]) for e in examples])):
            e["feats"] = part
        return
    _compute_features(target, examples, batch_tokens, progress, reads)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".partial")
        save_file({"feats": torch.cat([e["feats"] for e in examples]).contiguous()}, str(tmp))
        os.replace(tmp, cached)


def _compute_features(target, examples: list[dict], batch_tokens: int, progress: bool,
                      reads: tuple[int, ...]) -> None:
    from sd2.progress import bar

    dev = next(target.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches, cur = [], []
    for i in order:
        if cur and len(examples[i]["input_ids"]) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    pbar = bar(progress=progress, total=sum(len(e["input_ids"]) for e in examples), desc="target features",
               unit="tok")
    for b in batches:
        width = max(len(examples[i]["input_ids"]) for i in b)
        ids = torch.zeros((len(b), width), dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            n = len(examples[i]["input_ids"])
            ids[r, :n] = torch.tensor(examples[i]["input_ids"])
            mask[r, :n] = 1
        h = target_features(target, ids.to(dev), mask.to(dev), reads).to("cpu", torch.float16)
        for r, i in enumerate(b):
            examples[i]["feats"] = h[r, : len(examples[i]["input_ids"])].clone()
        pbar.update(int(mask.sum()))
    pbar.close()


def unrolled_mask(pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attention for a two-step unrolled forward (training-time test, EAGLE-3): the sequence is the n pairs made
    from the target's features, then n - 1 pairs made from the drafter's own (pair i + 1 of the second step).
    A first-step pair sees the first-step pairs up to itself; second-step pair i + 1 sees first-step pairs 0..i and
    itself — what the engine's second draft step sees. `pad` [B, n] (1 = token); returns an additive mask
    [B, 1, 2n - 1, 2n - 1]."""
    b, n = pad.shape
    ok = torch.zeros((2 * n - 1, 2 * n - 1), dtype=torch.bool, device=pad.device)
    ok[:n, :n] = torch.ones((n, n), dtype=torch.bool, device=pad.device).tril()
    ok[n:, : n - 1] = torch.ones((n - 1, n - 1), dtype=torch.bool, device=pad.device).tril()
    ok[n:, n:] = torch.eye(n - 1, dtype=torch.bool, device=pad.device)
    keys = torch.cat([pad, pad[:, 1:]], 1).bool()  # a second-step pair exists where its first-step twin does
    allowed = ok[None] & keys[:, None, :]
    allowed |= torch.eye(2 * n - 1, dtype=torch.bool, device=pad.device)[None]  # padding rows: avoid empty rows
    return torch.zeros(allowed.shape, dtype=dtype, device=pad.device).masked_fill(~allowed, torch.finfo(dtype).min
                                                                                   )[:, None]


def unrolled_forward(model, ids: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor):
    """The two-step training forward (training-time test) over a batch of sequences `ids` [B, T] with the target's
    features `feats` [B, T - 1, ·] of pairs 0..T-2: step one from the target's features, step two from the
    drafter's own (unrolled_mask). Returns (step-one outputs, its logits, its features, step-two logits)."""
    n = ids.shape[1] - 1
    first = model(input_ids=ids[:, 1:], feats=feats, attention_mask=mask[:, 1:])
    h1 = first.hidden_states[0]
    both = model(input_ids=torch.cat([ids[:, 1:], ids[:, 2:]], 1), feats=feats, own=h1[:, :-1],
                 attention_mask=unrolled_mask(mask[:, 1:], h1.dtype),
                 position_ids=torch.cat([torch.arange(n), torch.arange(1, n)]).to(ids.device)[None])
    return first, both.logits[:, :n], both.hidden_states[0][:, :n], both.logits[:, n:]
