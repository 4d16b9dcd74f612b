"""A lean decode-time forward for Llama-architecture models (SmolLM2, Llama; no biases).

Why: at batch 1 on a CPU, HF's module forward adds per-module overhead to every decode step, and the stock fp32
GEMMs make a forward over γ+1 new tokens (verification) cost about 2.5× a one-token step. This forward runs the
model's own weights with:
  - fused projections (q|k|v in one GEMM, gate|up in one GEMM): 4 GEMMs a layer instead of 7;
  - a preallocated KV cache (a tensor per layer, written in place; rolling back is moving a length);
  - rotary tables computed once for all positions;
  - no masks for a single new token, one small causal mask for several;
  - with fp16 weights (`lean-fp16`, the CPU default): each decoder layer is one call into sd2's C kernel
    (sd2/kernels/cpu.c via sd2.fastpath): fp16-weight GEMMs that reuse each weight tile for all γ+1 rows,
    RMSNorm, rotary, attention over the cache and SwiGLU in C, on torch's threads — no per-op dispatch.
    Every row is computed in a fixed order, so a token's logits are the same bits whether it is decoded alone
    or verified among γ others: speculative decoding reproduces target-only decoding by construction.
It computes what the HF module computes (tested against it within tolerance), but not bit for bit, so it is its
own numeric path: speculative and target-only decoding both run it, and lossless is judged within it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd2.errors import UserError
from sd2.sharedkv import kv_layers

_SUPPORTED = {"llama"}


def supports(model) -> bool:
    """Llama-style decoders (RMSNorm, rotary, GQA attention, SwiGLU MLP) without biases."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (getattr(cfg, "model_type", None) in _SUPPORTED and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and getattr(cfg, "hidden_act", "silu") == "silu"
            and hasattr(getattr(model, "model", None), "layers") and head_dim <= 512)


def _dense(w: torch.Tensor):
    w = w.detach().contiguous()
    return lambda x: F.linear(x, w)


def _packed(w: torch.Tensor):
    from sd2.fastpath import packed_linear

    return packed_linear(w)


def _fused(layer) -> tuple:
    """One decoder layer's weights as the lean forward reads them: (ln1, q|k|v, o, ln2, gate|up, down, inter)."""
    a, m = layer.self_attn, layer.mlp
    return (layer.input_layernorm.weight.detach(), torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            a.o_proj.weight.detach(), layer.post_attention_layernorm.weight.detach(),
            torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight.detach(), m.gate_proj.weight.shape[0])


def _native_layers(lm: "LeanLM", inner) -> list:
    """Each decoder layer as the C kernel's spec (fp16 tiles, fp32 norms), with the tensors it points to."""
    from sd2.fastpath import LayerSpec, pack

    out = []
    for layer in inner.layers:
        ln1, qkv, o, ln2, gate_up, down, inter = _fused(layer)
        keep = [ln1.float().contiguous(), ln2.float().contiguous(), pack(qkv), pack(o), pack(gate_up), pack(down)]
        out.append((LayerSpec(lm.hidden, lm.n_heads, lm.n_kv, lm.head_dim, inter, lm.eps,
                              *(t.data_ptr() for t in keep)), keep))
    return out


class LeanLM:
    """The weights of one model prepared for lean decoding (fused, optionally fp16 in the C kernel), built once;
    `session()` gives a KV cache to decode one sequence with."""

    def __init__(self, model, fp16_weights: bool = False):
        if not supports(model):
            raise UserError(f"lean engine: {getattr(model.config, 'model_type', '?')} models are not supported; "
                            "use --fast-path none (the HF modules)")
        cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.hidden, self.n_layers = cfg.hidden_size, len(model.model.layers)
        self.kv_layers = kv_layers(model.config)  # over another model's cache, layer j writes and reads these
        lin = _packed if fp16_weights else _dense
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.layers, self.native = [], None
        if fp16_weights:  # one C call per layer; activations and the KV cache in fp32
            from sd2.fastpath import kernel

            self.kernel, self.dtype, self.embed = kernel(), torch.float32, self.embed.float()
            self.native = _native_layers(self, inner)
        else:
            for ln1, qkv, o, ln2, gate_up, down, inter in map(_fused, inner.layers):
                self.layers.append((ln1, lin(qkv), lin(o), ln2, lin(gate_up), lin(down), inter))
        self.norm = inner.norm.weight.detach().to(self.dtype).contiguous()
        self.lm_head = lin(model.get_output_embeddings().weight)
        fc = getattr(model, "eagle_fc", None)  # a feature drafter (sd2.eagle): fc([embed; target feature])
        self.fc = lin(fc.weight) if fc is not None else None
        reduce = getattr(model, "eagle_reduce", None)  # its multi-layer target features → hidden size
        self.reduce = lin(reduce.weight) if reduce is not None else None
        self.rotary = inner.rotary_emb
        self.cos = self.sin = torch.empty(0)
        self._tables(256)

    def _tables(self, n: int) -> None:
        """Rotary cos/sin for positions [0, n)."""
        if n <= self.cos.shape[0]:
            return
        n = max(n, 2 * self.cos.shape[0])
        pos = torch.arange(n, device=self.device)[None]
        cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype, device=self.device), pos)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [n, head_dim]

    def session(self, capacity: int = 512, share: "LeanSession | None" = None) -> "LeanSession":
        return LeanSession(self, capacity, share)

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.native is not None:  # the kernel's per-row code: the same bits for a row alone or among others
            x = x.contiguous()
            out = torch.empty_like(x)
            self.kernel.sd2_rms(x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), self.eps, out.data_ptr())
            return out
        if x.dtype == torch.float32:  # one fused op; HF's formula in fp32 (below) for lower precisions
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanSession:
    """One sequence's KV cache over a LeanLM. `forward(new_ids, keep)` appends `new_ids` at the current length
    and returns the logits [keep, V] of the last `keep` positions; `rollback(n)` keeps the first n positions.
    `feats` (a feature drafter's input) and `hidden` (also return the features of the new positions: True = the
    normed hidden states the head reads, a tuple = sd2.eagle's multi-layer features) serve feature drafting.
    `share` (another model's session, the same cache layout) makes this one read and write that session's KV
    buffers (sd2.sharedkv: a drafter over the target's cache); its own `length` says where it writes."""

    def __init__(self, lm: LeanLM, capacity: int, share: "LeanSession | None" = None):
        self.lm = lm
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity = 0
        self.share = share
        # the cache layer each layer uses: its own, or over a shared cache the owner's layer it maps to
        self.kv = list(range(lm.n_layers)) if share is None else list(lm.kv_layers)
        if share is None:
            self._grow(capacity)
        else:
            self._follow(0)

    def _follow(self, end: int) -> None:
        """A shared session: the owner's buffers, grown first (keeping what this one wrote) if `end` needs it."""
        own = self.share
        if end > own.capacity:
            own._grow(end, keep=max(own.length, self.length))
        self.k, self.v, self.capacity = own.k, own.v, own.capacity
        self.lm._tables(self.capacity)

    def _grow(self, n: int, keep: int | None = None) -> None:
        n = max(n, 2 * self.capacity)
        keep = self.length if keep is None else keep
        lm = self.lm
        if lm.native is not None:
            n = -(-n // 64) * 64  # the kernel scores 64 keys per block
        shape = (lm.n_kv, n, lm.head_dim)
        # the C kernel keeps keys dimension-major [n_kv, hd, n] (its scores are then 16 keys per vector op)
        kshape = (lm.n_kv, lm.head_dim, n) if lm.native is not None else shape
        k = [torch.empty(kshape, dtype=lm.dtype, device=lm.device) for _ in range(lm.n_layers)]
        v = [torch.empty(shape, dtype=lm.dtype, device=lm.device) for _ in range(lm.n_layers)]
        kpos = 2 if lm.native is not None else 1  # the axis keys' positions run along
        for o, nw in zip(self.k, k):
            nw.narrow(kpos, 0, keep).copy_(o.narrow(kpos, 0, keep))
        for o, nw in zip(self.v, v):
            nw[:, :keep] = o[:, :keep]
        self.k, self.v, self.capacity = k, v, n
        lm._tables(n)

    @torch.inference_mode()
    def forward(self, new_ids: list[int], keep: int = 1, feats: torch.Tensor | None = None,
                hidden: bool | tuple[int, ...] = False):
        lm = self.lm
        t, start = len(new_ids), self.length
        end = start + t
        if self.share is not None:
            self._follow(end)
        elif end > self.capacity:
            self._grow(end)
        x = lm.embed[torch.tensor(new_ids, device=lm.device)]  # [t, hidden]
        if lm.fc is not None:
            f = torch.zeros_like(x) if feats is None else feats.to(x.dtype)
            if f.shape[-1] != x.shape[-1]:
                f = lm.reduce(f)
            x = lm.fc(torch.cat([x, f], -1))
        reads = (-1,) if hidden is True else tuple(hidden or ())
        outs: dict[int, torch.Tensor] = {}
        if lm.native is not None:
            x = self._native(x.float().contiguous(), start, reads, outs)
        else:
            x = self._layers(x, start, reads, outs)
        self.length = end
        if reads:
            from sd2.eagle import gather

            h = lm.rms(x, lm.norm)
            return lm.lm_head(h[t - keep:]).float(), gather(outs, h, reads)
        return lm.lm_head(lm.rms(x[t - keep:], lm.norm)).float()

    def _native(self, x: torch.Tensor, start: int, reads: tuple, outs: dict) -> torch.Tensor:
        """The decoder layers through the C kernel, x [t, hidden] updated in place."""
        lm, t = self.lm, x.shape[0]
        threads = torch.get_num_threads()
        scratch = torch.empty(lm.kernel.sd2_layer_scratch(lm.native[0][0], t, self.capacity, threads))
        for li, (spec, _) in enumerate(lm.native):
            kv = self.kv[li]
            lm.kernel.sd2_layer_forward(spec, x.data_ptr(), t, start, self.k[kv].data_ptr(), self.v[kv].data_ptr(),
                                        self.capacity, lm.cos.data_ptr(), lm.sin.data_ptr(), scratch.data_ptr(),
                                        threads)
            if li in reads:
                outs[li] = x.clone()
        return x

    def _layers(self, x: torch.Tensor, start: int, reads: tuple, outs: dict) -> torch.Tensor:
        """The decoder layers as torch ops (fp32 or the model's dtype)."""
        lm, t = self.lm, x.shape[0]
        end = start + t
        cos, sin = lm.cos[start:end], lm.sin[start:end]
        # one new token sees everything cached; several see the cache and the new ones up to themselves
        mask = torch.ones(t, end, dtype=torch.bool, device=lm.device).tril(diagonal=start) if t > 1 else None
        nq, nkv, hd = lm.n_heads, lm.n_kv, lm.head_dim
        cos, sin = cos[None], sin[None]  # [1, t, hd]: broadcast over the q and k heads at once
        for li, (ln1, qkv, o, ln2, gate_up, down, inter) in enumerate(lm.layers):
            h = qkv(lm.rms(x, ln1)).view(t, nq + 2 * nkv, hd).transpose(0, 1)  # [heads, t, hd]
            qk = _rope(h[: nq + nkv], cos, sin)
            q, kv = qk[:nq], self.kv[li]
            self.k[kv][:, start:end] = qk[nq:]
            self.v[kv][:, start:end] = h[nq + nkv:]
            att = F.scaled_dot_product_attention(q[None], self.k[kv][None, :, :end], self.v[kv][None, :, :end],
                                                 attn_mask=mask, enable_gqa=nq != nkv)
            x = x + o(att[0].transpose(0, 1).reshape(t, nq * hd))
            g = gate_up(lm.rms(x, ln2))
            x = x + down(F.silu(g[:, :inter]) * g[:, inter:])
            if li in reads:
                outs[li] = x
        return x

    def rollback(self, n_valid: int) -> None:
        self.length = min(self.length, n_valid)


def attach(model, fp16_weights: bool = False):
    """Prepare `model` for the lean engine (sd2.specdec uses it when present); returns the model."""
    model.sd2_lean = LeanLM(model, fp16_weights)
    return model


def detach(model) -> None:
    if hasattr(model, "sd2_lean"):
        del model.sd2_lean
