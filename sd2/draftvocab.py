"""Draft vocabulary (FR-Spec; EAGLE-3's `d2t` map): the drafter's head keeps only the K target tokens that are
most frequent in the distilled data. On the 576-wide SmolLM2 drafter the full 49,152-row head is ~42% of the
drafter's MACs; a 8k-row head cuts that six-fold. The target still verifies every token, so decoding stays
lossless; the drafter simply never proposes a token outside its vocabulary.

On disk a drafter keeps a plain, full-size head (rows outside the draft vocabulary are zero) plus
`draft_vocab.json` (the K token ids, in head order): plain transformers loads it as an `assistant_model`, and
sd2 loads it with the compact head (so MACs and time count K rows).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sd2.errors import UserError

FILE = "draft_vocab.json"


def check_size(k: int, vocab_size: int) -> None:
    if not 1 <= k <= vocab_size:
        raise UserError(f"--draft-vocab {k}: must be between 1 and the target's vocabulary size ({vocab_size}); "
                        "try 8192, or 0 for the full head")


def token_counts(ds, tok, use_ids: bool = True) -> Counter:
    """How often each token appears in the responses: the target's own ids when the data stores them and `use_ids`
    (same tokenizer), else the responses tokenized with `tok`."""
    counts: Counter = Counter()
    ids_col = use_ids and "response_ids" in ds.column_names
    for row in ds:
        counts.update(row["response_ids"] if ids_col else tok.encode(row["response"], add_special_tokens=False))
    return counts


def choose(counts: Counter, k: int, vocab_size: int, always: set[int] = frozenset()) -> list[int]:
    """The K most frequent ids (the `always` ones — EOS — first); ties and unseen ids by lowest id (BPE gives low
    ids to frequent merges). Sorted, so the map is a stable function of the data."""
    check_size(k, vocab_size)
    picked = [t for t in sorted(always) if 0 <= t < vocab_size][:k]
    chosen = set(picked)
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(picked) >= k:
            break
        if t not in chosen and 0 <= t < vocab_size:
            picked.append(t)
            chosen.add(t)
    t = 0
    while len(picked) < k:
        if t not in chosen:
            picked.append(t)
        t += 1
    return sorted(picked)


def draft_ids(model) -> torch.Tensor | None:
    """The draft vocabulary of a model loaded with its compact head (None: full head)."""
    return getattr(model, "sd2_draft_ids", None)


def compact_head(model, ids: list[int]) -> nn.Module:
    """Replace the output head by its rows `ids` (untied from the input embeddings)."""
    full = model.get_output_embeddings()
    check_size(len(ids), full.weight.shape[0])
    head = nn.Linear(full.weight.shape[1], len(ids), bias=False, device=full.weight.device, dtype=full.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(full.weight[torch.tensor(ids, device=full.weight.device)])
    model.set_output_embeddings(head)
    _untie(model)
    model.sd2_draft_ids = torch.tensor(ids, dtype=torch.long)
    model.sd2_full_vocab = full.weight.shape[0]
    model.sd2_draft_set = frozenset(ids)
    return model


class _Widened(nn.Module):
    """A compact head seen as a full-vocabulary one: logits 0 outside the draft vocabulary (the zero rows of the
    saved head), the compact GEMM (dense or packed) inside."""

    def __init__(self, compact: nn.Module, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.compact, self.vocab_size = compact, vocab_size
        self.register_buffer("ids", ids.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_logits(self.compact(x), self.ids, self.vocab_size, fill=0.0)


@contextmanager
def wide_head(model):
    """Temporarily give a compact-head model a full-vocabulary head, computing what plain transformers computes
    with the saved drafter (zero rows outside the draft vocabulary), e.g. as HF's `assistant_model`."""
    ids = draft_ids(model)
    if ids is None:
        yield model
        return
    compact = model.get_output_embeddings()
    model.set_output_embeddings(_Widened(compact, ids, model.sd2_full_vocab))
    try:
        yield model
    finally:
        model.set_output_embeddings(compact)


class _WithRows(nn.Module):
    """A compact head plus extra rows (their logits appended after the K compact ones)."""

    def __init__(self, head: nn.Module, rows: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        return torch.cat([out, F.linear(x.to(self.rows.dtype), self.rows).to(out.dtype)], -1)


def head_source(target) -> torch.Tensor:
    """The target's output-head weights [V, hidden] (its input embeddings when the two are tied): where a prompt's
    extra draft rows come from."""
    head = target.get_output_embeddings()
    w = getattr(head, "weight", None)
    if w is None and getattr(target.config, "tie_word_embeddings", False):
        w = target.get_input_embeddings().weight
    if w is None:
        raise UserError("--prompt-vocab: the target's head weights are packed away on this numeric path; use "
                        "--fast-path lean-fp16, lean or none")
    return w.detach()


def missing_ids(model, prompt: list[int]) -> list[int]:
    """The prompt's token ids that a compact-head model's draft vocabulary lacks (none for a full head)."""
    if draft_ids(model) is None:
        return []
    known = model.sd2_draft_set  # set beside the map by compact_head (prompt_rows only widens the map for a prompt)
    return sorted(t for t in set(prompt) if 0 <= t < model.sd2_full_vocab and t not in known)


@contextmanager
def prompt_rows(model, source: torch.Tensor, prompt: list[int]):
    """For one prompt, widen a compact draft head by the rows of `source` (the target's head, `head_source`) for
    the prompt's tokens outside the draft vocabulary; yields how many rows it added (0: a full head, or nothing
    missing). Why: what a frequency list of the distilled data misses most is what answers copy from their prompt
    (names, numbers, rare words, the passage of a RAG or summarization request); P extra rows cost P × hidden
    MACs per drafted token (≈ 0.05% of SmolLM2-135M per 100 rows). Lossless like the compact head itself."""
    ids = draft_ids(model)
    extra = missing_ids(model, prompt)
    if not extra:
        yield 0
        return
    head = model.get_output_embeddings()
    lean = getattr(model, "sd2_lean", None)
    dtype = torch.float32 if lean is not None else next(model.parameters()).dtype
    rows = source[torch.tensor(extra, device=source.device)].to(next(model.parameters()).device, dtype)
    wide = _WithRows(head, rows)
    model.set_output_embeddings(wide)
    model.sd2_draft_ids = torch.cat([ids, torch.tensor(extra, dtype=torch.long)])
    if lean is not None:
        lean_head, lean.lm_head = lean.lm_head, _WithRows(lean.lm_head, rows)
    try:
        yield len(extra)
    finally:
        model.set_output_embeddings(head)
        model.sd2_draft_ids = ids
        if lean is not None:
            lean.lm_head = lean_head


def _untie(model) -> None:
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def full_logits(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int, fill: float = float("-inf")
                ) -> torch.Tensor:
    """Compact-head logits [..., K] → full-vocabulary logits [..., V], `fill` outside the draft vocabulary (-inf:
    never proposed; 0: what the saved zero rows give)."""
    out = logits.new_full((*logits.shape[:-1], vocab_size), fill)
    out[..., ids.to(logits.device)] = logits
    return out


def to_full(model):
    """logits ↦ full-vocabulary logits for this model's head: identity for a full head."""
    ids = draft_ids(model)
    if ids is None:
        return lambda logits: logits
    return lambda logits: full_logits(logits, ids, model.sd2_full_vocab)


def to_draft(ids: torch.Tensor, dmap: torch.Tensor, vocab_size: int, missing: int = -100) -> torch.Tensor:
    """Target ids → draft-head indices (`missing` for ids outside the draft vocabulary); other negatives stay."""
    t2d = torch.full((vocab_size,), missing, dtype=torch.long, device=ids.device)
    t2d[dmap.to(ids.device)] = torch.arange(len(dmap), device=ids.device)
    return torch.where(ids >= 0, t2d[ids.clamp(min=0)], ids)


def save(out: Path, ids: list[int], vocab_size: int, source: dict | None = None) -> None:
    """Write the map beside saved weights and widen the saved head back to the full vocabulary (zero rows
    outside it), so the folder is a plain transformers model."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    files = sorted(out.glob("*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        key = next((k for k in tensors if k.endswith("lm_head.weight")), None)
        if key is None or tensors[key].shape[0] == vocab_size:
            continue
        head = tensors[key]
        wide = head.new_zeros((vocab_size, head.shape[1]))
        wide[torch.tensor(ids)] = head
        tensors[key] = wide
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["tie_word_embeddings"] = False
    cfg_file.write_text(json.dumps(cfg, indent=2))
    (out / FILE).write_text(json.dumps({"draft_ids": list(map(int, ids)), "vocab_size": vocab_size,
                                        "size": len(ids), **(source or {})}))


def load(path: Path) -> list[int] | None:
    f = Path(path) / FILE
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    ids = meta.get("draft_ids")
    if not isinstance(ids, list) or not ids or len(set(ids)) != len(ids):
        raise UserError(f"{f}: corrupt draft vocabulary (expected a list of distinct token ids)")
    return ids
