"""Speculative decoding engine, batch 1: a drafter proposes, the target verifies in one pass.

Greedy: accept drafts while they equal the target's argmax, then emit the target's own token (the bonus).
Sampling: Leviathan et al. rejection sampling with the residual distribution max(0, p - q), so outputs
follow the target's distribution exactly. Both KV caches roll back to the accepted prefix.
Cross-tokenizer drafters (Universal Assisted Generation): the drafter sees the target's text re-encoded
with its own tokenizer and its drafts are re-encoded with the target tokenizer; the candidates are then
treated as a point-mass proposal, which keeps sampling exact (accept d with probability p(d)).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from sd2.config import LOOKUP_MAX
from sd2.device import synchronize
from sd2.draftvocab import head_source, prompt_rows, to_full, wide_head
from sd2.eagle import feature_layers, is_feature_drafter, target_features
from sd2.errors import UserError
from sd2.sharedkv import kv_layers, reading_target_layers


@dataclass
class Step:
    drafted: int
    accepted: int


@dataclass
class DecodeResult:
    """What one prompt's decoding produced: new token ids (target vocab) and per-step records."""

    tokens: list[int]
    steps: list[Step] = field(default_factory=list)
    target_passes: int = 0
    seconds: float = 0.0
    first_step_seconds: float = 0.0  # the first step: prefill of the prompt (+ its drafts), first token(s)
    first_step_tokens: int = 0
    looked_up: int = 0  # steps whose drafts came from prompt lookup
    prompt_rows: int = 0  # rows the drafter's compact head had for this prompt's own tokens (prompt_vocab)

    @property
    def mal(self) -> float:
        return len(self.tokens) / self.target_passes if self.target_passes else 0.0


def eos_ids(model, tokenizer=None) -> set[int]:
    """All ids that end generation: generation_config's eos (may be a list) plus the tokenizer's."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class _LeanCached:
    """The same interface over sd2.lean (a preallocated KV cache and fused weights), for models prepared with
    sd2.lean.attach."""

    def __init__(self, model, capacity: int = 512, share: "_LeanCached | None" = None):
        self.model = model
        self.share = share
        if share is not None:
            _check_lean_share(model.sd2_lean, share.session.lm)
        self.session = model.sd2_lean.session(capacity, share=share.session if share is not None else None)
        self.ids: list[int] = []

    def forward(self, ids: list[int], keep: int, feats: torch.Tensor | None = None,
                hidden: bool | tuple[int, ...] = False):
        new = ids[len(self.ids):]
        assert new and keep <= len(new), "forward() needs new tokens, at least `keep` of them"
        out = self.session.forward(new, keep, feats=feats, hidden=hidden)
        self.ids = list(ids)
        return out

    def rollback(self, n_valid: int) -> None:
        n = min(n_valid, len(self.ids))
        self.session.rollback(n)
        del self.ids[n:]

    def common_prefix(self, ids: list[int]) -> None:
        _common_prefix(self, ids)

    def follow(self) -> None:
        """A shared cache: start from what the owner holds (its committed positions)."""
        self.ids = list(self.share.ids)
        self.session.length = self.share.session.length

    def release(self) -> None:
        """Nothing to undo: the owner's next forward overwrites the rows this one wrote past its length."""


def _check_lean_share(lm, owner) -> None:
    if (lm.native is None) != (owner.native is None) or lm.dtype != owner.dtype or max(lm.kv_layers) >= owner.n_layers:
        raise UserError("--shared-kv: the drafter and the target run on different numeric paths (their KV caches "
                        "differ in layout or dtype); use one --fast-path for both (lean-fp16, lean or none)")


def _common_prefix(cache, ids: list[int]) -> None:
    """Invalidate everything after the longest common prefix of the cache and `ids`."""
    n = 0
    for a, b in zip(cache.ids, ids):
        if a != b:
            break
        n += 1
    cache.rollback(min(n, len(ids) - 1))


def cached(model, capacity: int = 512, share=None):
    """A KV-cached decoder for `model`: the lean engine when the model was prepared for it, else HF's modules.
    `share`: another model's cached decoder whose KV cache this one reads and writes (sd2.sharedkv)."""
    lean = getattr(model, "sd2_lean", None) is not None
    if share is not None and lean != isinstance(share, _LeanCached):
        raise UserError("--shared-kv: the drafter and the target run on different engines (lean vs HF modules); use "
                        "one --fast-path for both")
    return _LeanCached(model, capacity, share) if lean else _Cached(model, share)


class _Cached:
    """A model plus its KV cache and the ids the cache holds; forward() feeds only what's new."""

    def __init__(self, model, share: "_Cached | None" = None):
        self.model = model
        self.share = share
        # Full layers everywhere, sliding-window models included (the mask still applies the window): a
        # sliding-window cache layer cannot roll back a multi-token verification once the context is longer
        # than the window (Gemma-3 beyond 512 tokens fails with a shape mismatch).
        self.cache = DynamicCache() if share is None else share.cache
        self.ids: list[int] = []
        self._recording = share is not None  # the owner records

    def forward(self, ids: list[int], keep: int, feats: torch.Tensor | None = None,
                hidden: bool | tuple[int, ...] = False):
        """Feed ids[len(self.ids):] and return logits [keep, V] for the last `keep` positions of `ids`; with
        `hidden`, also the features of all new positions (True: the normed hidden states; a tuple: the layers a
        feature drafter reads, sd2.eagle); `feats` are a feature drafter's own inputs for the new positions."""
        new = ids[len(self.ids):]
        assert new, "forward() needs at least one new token"
        assert keep <= len(new)
        inp = torch.tensor([new], dtype=torch.long, device=self.model.device)
        h = None
        if feats is not None or (hidden and is_feature_drafter(self.model)):
            out = self.model(input_ids=inp, feats=None if feats is None else feats[None], cache=self.cache,
                             use_cache=True, logits_to_keep=keep)
            logits, h = out.logits, out.hidden_states[0]
        elif hidden:  # the target: its features, then its head on the kept final normed states
            reads = (-1,) if hidden is True else tuple(hidden)
            h = target_features(self.model, inp, reads=reads, cache=self.cache, use_cache=True)
            logits = self.model.lm_head(h[:, -keep:, -self.model.config.hidden_size:])
        else:
            logits = self.model(input_ids=inp, cache=self.cache, use_cache=True, logits_to_keep=keep).logits
        self.ids = list(ids)
        if not self._recording:  # after the prefill, as HF does: lets sliding-window layers roll back
            self.cache.activate_past_recording()
            self._recording = True
        return (logits[0].float(), h[0]) if hidden else logits[0].float()

    def rollback(self, n_valid: int) -> None:
        """Keep the first n_valid cached tokens (crop(0) still lets sliding-window layers shrink)."""
        drop = max(0, len(self.ids) - n_valid)
        self.cache.crop(-drop)
        del self.ids[len(self.ids) - drop:]

    def common_prefix(self, ids: list[int]) -> None:
        _common_prefix(self, ids)

    def follow(self) -> None:
        self.ids = list(self.share.ids)

    def release(self) -> None:
        """Drop what this one appended to the owner's cache (its drafts). A layer slice wrote only the layers it
        reads, so the others are cut to the owner's length, not by the drafts' count."""
        n = len(self.share.ids)
        if kv_layers(self.model.config) == list(range(len(self.cache.layers))):
            self.rollback(n)
            return
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - n
            if extra > 0:
                layer.crop(-extra)
        del self.ids[n:]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _draft_token(logits: torch.Tensor, temperature: float, gen: torch.Generator | None,
                 threshold: float | None) -> tuple[int | None, torch.Tensor | None]:
    """The drafter's next token (argmax, or a sample from q at `temperature`) and q when sampling; None when the
    drafter is unsure — dynamic draft length: its top-1 probability is below `threshold`. The rule looks at the
    drafter only, so verification stays exact (greedy and sampling)."""
    q = _probs(logits.cpu(), temperature) if temperature > 0 else None
    if threshold is not None:
        p = q if q is not None else torch.softmax(logits.float(), -1)
        if float(p.max()) < threshold:
            return None, q
    if q is not None:
        return int(torch.multinomial(q, 1, generator=gen)), q
    return int(logits.argmax()), None


def _draft_chain(prop, logits: torch.Tensor, step, n: int) -> tuple[list[int], list[torch.Tensor] | None]:
    """Up to n drafts of a proposer (its eos, temperature, generator, threshold and full-vocabulary map): `logits`
    predict the first, `step(token)` appends a draft and returns the logits after it. Stops at an unsure drafter
    (dynamic draft length) and after an end token; the drafter's q per draft when sampling."""
    drafts: list[int] = []
    qs: list[torch.Tensor] = []
    for i in range(n):
        tok, q = _draft_token(prop.full(logits[-1]), prop.temperature, prop.gen, prop.threshold)
        if tok is None:
            break
        if q is not None:
            qs.append(q)
        drafts.append(tok)
        if tok in prop.eos or i == n - 1:
            break
        logits = step(tok)
    return drafts, (qs if prop.temperature > 0 else None)


class _SameVocabProposer:
    """Drafter sharing the target's tokenizer: proposes ids directly, with its probabilities when sampling."""

    def __init__(self, drafter, eos: set[int], temperature: float, gen: torch.Generator | None, capacity: int = 512,
                 threshold: float | None = None, share=None):
        self.d = cached(drafter, capacity, share)
        self.eos, self.temperature, self.gen = eos, temperature, gen
        self.threshold = threshold
        self.full = to_full(drafter)  # a compact draft head's logits, placed in the full vocabulary

    def propose(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor] | None]:
        if n <= 0:
            return [], None
        if len(self.d.ids) >= len(ids):
            self.d.rollback(len(ids) - 1)
        return self._chain(ids, n)

    def _chain(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to n drafts after `ids`, the drafter's cache fed from where it holds them."""
        seq = list(ids)

        def step(tok: int) -> torch.Tensor:
            seq.append(tok)
            return self.d.forward(seq, keep=1)

        return _draft_chain(self, self.d.forward(seq, keep=1), step, n)

    def accepted(self, ids: list[int]) -> None:
        self.d.rollback(len(ids))


class _SharedKVProposer(_SameVocabProposer):
    """A pruned copy of the target that drafts over the target's own KV cache (sd2.sharedkv): the committed
    context's keys and values are the target's; the drafter writes its own only for the token it starts from and
    its drafts, past the target's length, where the next verification overwrites them. Nothing is drafted before
    the target's first pass."""

    def __init__(self, drafter, target_cache, eos: set[int], temperature: float, gen: torch.Generator | None,
                 threshold: float | None = None):
        super().__init__(drafter, eos, temperature, gen, threshold=threshold, share=target_cache)
        self.t = target_cache

    def propose(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor] | None]:
        if n <= 0 or not self.t.ids:
            return [], None
        assert len(self.t.ids) == len(ids) - 1, "the target must hold every committed position but the last"
        self.d.follow()
        try:  # HF modules index the cache by layer_idx: a layer slice maps them onto the target's (the lean path
            # maps in its session)
            with nullcontext() if isinstance(self.d, _LeanCached) else reading_target_layers(self.d.model):
                return self._chain(ids, n)
        finally:
            self.d.release()

    def accepted(self, ids: list[int]) -> None:
        pass  # the target's cache is the context; nothing of the drafter's own is kept


class _FeatureProposer:
    """A feature drafter (sd2.eagle): pair j of its cache is (x_{j+1}, the target's feature f_j). Pairs made from the
    target's own features are kept across steps; pairs made from the drafter's predicted features (its drafts) are
    rolled back once the target has verified them and its real features are known."""

    def __init__(self, drafter, eos: set[int], temperature: float, gen: torch.Generator | None, capacity: int = 512,
                 threshold: float | None = None):
        self.reads = feature_layers(drafter.config)  # the target layers it reads (the engine asks the target)
        self.d = cached(drafter, capacity)
        self.eos, self.temperature, self.gen, self.threshold = eos, temperature, gen, threshold
        self.full = to_full(drafter)
        self.feats: list[torch.Tensor] = []  # the target's features of committed positions, in chunks
        self.n_feats = 0
        self.true_pairs = 0  # leading drafter-cache pairs built from the target's own features

    def observe(self, feats: torch.Tensor) -> None:
        """The target's features of newly committed positions (in order)."""
        if feats.shape[0]:
            self.feats.append(feats)
            self.n_feats += feats.shape[0]

    def propose(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor] | None]:
        if self.n_feats == 0:  # the first step: the target has not run yet
            return [], None
        assert self.n_feats == len(ids) - 1, "the target's features must cover every committed position but the last"
        if len(self.feats) > 1:
            self.feats = [torch.cat(self.feats)]
        self.d.rollback(self.true_pairs)
        seq = ids[1: len(ids)]  # pair j's token is x_{j+1}
        logits, h = self.d.forward(seq, keep=1, feats=self.feats[0][self.true_pairs:], hidden=True)
        self.true_pairs = len(seq)

        def step(tok: int) -> torch.Tensor:  # the next pair reads the drafter's own feature of the last one
            nonlocal h
            seq.append(tok)
            out, h = self.d.forward(seq, keep=1, feats=h[-1:], hidden=True)
            return out

        return _draft_chain(self, logits, step, n)

    def accepted(self, ids: list[int]) -> None:
        pass  # rolled back to the pairs built from real features on the next propose()


class _CrossVocabProposer:
    """Drafter with another tokenizer (UAG): text is the common currency between the two vocabularies."""

    def __init__(self, drafter, target_tok, drafter_tok, drafter_prompt: list[int], prompt_len: int,
                 target_eos: int | None, temperature: float, gen: torch.Generator | None, capacity: int = 512,
                 threshold: float | None = None):
        self.d = cached(drafter, capacity)
        self.threshold = threshold
        self.ttok, self.dtok = target_tok, drafter_tok
        self.dprompt, self.prompt_len = list(drafter_prompt), prompt_len
        self.deos = eos_ids(drafter, drafter_tok)
        self.target_eos = target_eos
        self.temperature, self.gen = temperature, gen
        self.full = to_full(drafter)
        self.drafter_tokens = 0  # drafter tokens of the final text, for the cross-tokenizer cost ratio

    def _drafter_ids(self, ids: list[int]) -> list[int]:
        text = self.ttok.decode(ids[self.prompt_len:], skip_special_tokens=True)
        return self.dprompt + (self.dtok.encode(text, add_special_tokens=False) if text else [])

    def propose(self, ids: list[int], n: int) -> tuple[list[int], None]:
        seq = self._drafter_ids(ids)
        self.d.common_prefix(seq)
        drafts: list[int] = []
        ended = False
        for _ in range(n):
            tok, _ = _draft_token(self.full(self.d.forward(seq, keep=1)[-1]), self.temperature, self.gen,
                                  self.threshold)
            if tok is None:
                break
            if tok in self.deos:
                ended = True
                break
            drafts.append(tok)
            seq.append(tok)
        text = self.dtok.decode(drafts, skip_special_tokens=True)
        cand = self.ttok.encode(text, add_special_tokens=False) if text else []
        if ended and self.target_eos is not None:
            cand.append(self.target_eos)
        return cand[:n], None

    def accepted(self, ids: list[int]) -> None:
        pass  # re-synchronised by common prefix on the next propose()


class NGramIndex:
    """Where each n-gram (min_n ≤ n ≤ LOOKUP_MAX) of a growing token list last occurred with a token after it:
    prompt lookup's table, extended with the committed tokens only (one dict update per new position)."""

    def __init__(self, min_n: int):
        self.min_n, self.max_n = min_n, max(min_n, LOOKUP_MAX)
        self.last: dict[tuple[int, ...], int] = {}  # n-gram → its latest start that has a following token
        self.done = 0  # n-grams ending before this position are indexed

    def propose(self, ids: list[int], k: int) -> list[int]:
        """The k tokens that followed the latest earlier occurrence of the longest suffix of `ids` found (n ≥ min_n);
        [] when none occurs earlier."""
        for end in range(self.done + 1, len(ids)):  # n-grams ending at `end - 1`, followed by ids[end]
            for n in range(self.min_n, self.max_n + 1):
                if end - n >= 0:
                    self.last[tuple(ids[end - n:end])] = end - n
        self.done = max(self.done, len(ids) - 1)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            start = self.last.get(tuple(ids[len(ids) - n:]))
            if start is not None:
                return ids[start + n:start + n + k]
        return []


class _LookupProposer:
    """Prompt lookup in front of a drafter (Saxena 2023; vLLM's n-gram speculator): when the context's last n tokens
    (n ≥ min_n) occurred before, draft what followed them there, else ask the drafter (none: draft nothing). Copying
    is free and on small targets, which repeat their context and themselves, often right. Its drafts are a point
    mass (no q), which rejection sampling treats exactly, so greedy stays lossless and sampling exact."""

    def __init__(self, inner, min_n: int, eos: set[int]):
        self.inner, self.index, self.eos = inner, NGramIndex(min_n), eos
        self.reads = getattr(inner, "reads", None)
        self.looked_up = 0  # steps whose drafts came from the context

    def observe(self, feats: torch.Tensor) -> None:
        self.inner.observe(feats)

    def propose(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor] | None]:
        drafts = self.index.propose(ids, n)
        for i, tok in enumerate(drafts):
            if tok in self.eos:
                drafts = drafts[:i + 1]
                break
        if drafts:
            self.looked_up += 1
            return drafts, None
        return self.inner.propose(ids, n) if self.inner is not None else ([], None)

    def accepted(self, ids: list[int]) -> None:
        if self.inner is not None:
            self.inner.accepted(ids)


class SpecDecoder:
    """Speculative decoding of one prompt at a time.

    `drafter=None` gives plain target-only decoding through the same forward path (the baseline); with `lookup`
    it is prompt-lookup decoding alone.
    """

    def __init__(self, target, drafter=None, *, gamma: int = 4, temperature: float = 0.0,
                 target_tokenizer=None, drafter_tokenizer=None, cross_tokenizer: bool = False,
                 draft_threshold: float | None = None, lookup: int = 0, shared_kv: bool = False,
                 prompt_vocab: bool = False):
        if gamma < 1:
            raise ValueError("gamma must be >= 1")
        if lookup < 0:
            raise ValueError("lookup must be >= 0 (0 = off)")
        self.lookup = lookup  # prompt lookup in front of the drafter: the shortest n-gram it matches
        if draft_threshold is not None and not 0 < draft_threshold < 1:
            raise ValueError("draft_threshold must be in (0, 1)")
        self.draft_threshold = draft_threshold  # dynamic draft length: γ is the maximum
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.target, self.drafter = target, drafter
        self.gamma, self.temperature = gamma, temperature
        self.ttok, self.dtok = target_tokenizer, drafter_tokenizer
        self.cross = cross_tokenizer
        if cross_tokenizer and (target_tokenizer is None or drafter_tokenizer is None):
            raise ValueError("cross-tokenizer decoding needs both tokenizers")
        self.eos = eos_ids(target, target_tokenizer)
        self.shared_kv = shared_kv  # the drafter reads the target's KV cache (sd2.sharedkv)
        if shared_kv and (drafter is None or cross_tokenizer or is_feature_drafter(drafter)):
            raise ValueError("shared_kv needs a same-vocabulary drafter cut from the target (not UAG or a feature "
                             "drafter)")
        if shared_kv:
            from sd2.sharedkv import check_pair

            check_pair(target.config, drafter.config)
        # a compact draft head also scores the prompt's own tokens (sd2.draftvocab.prompt_rows)
        self.prompt_vocab = prompt_vocab and drafter is not None and not cross_tokenizer
        self._head_source = None

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, *, seed: int = 0,
                 drafter_prompt: list[int] | None = None) -> DecodeResult:
        gen = torch.Generator().manual_seed(seed) if self.temperature > 0 else None  # sampling runs on CPU copies
        synchronize(self.target.device)
        t0 = time.perf_counter()
        capacity = len(prompt) + max_new_tokens + self.gamma + 2
        with self._prompt_rows(prompt) as n_rows:
            target = cached(self.target, capacity)
            res = self._decode(target, self._proposer(target, gen, capacity, drafter_prompt, len(prompt)), prompt,
                               max_new_tokens, gen, t0)
        res.prompt_rows = n_rows
        return res

    def _prompt_rows(self, prompt: list[int]):
        """The drafter's compact head widened by the prompt's tokens for this prompt (`prompt_vocab`)."""
        if not self.prompt_vocab:
            return nullcontext(0)
        if self._head_source is None:
            self._head_source = head_source(self.target)
        return prompt_rows(self.drafter, self._head_source, prompt)

    def _proposer(self, target, gen, capacity: int, drafter_prompt: list[int] | None, prompt_len: int):
        proposer = None
        if self.drafter is not None:
            if self.cross:
                teos = self.ttok.eos_token_id if self.ttok.eos_token_id is not None else next(iter(self.eos), None)
                dprompt = drafter_prompt if drafter_prompt is not None else []
                proposer = _CrossVocabProposer(self.drafter, self.ttok, self.dtok, dprompt, prompt_len, teos,
                                               self.temperature, gen, capacity=2 * capacity + len(dprompt),
                                               threshold=self.draft_threshold)
            elif self.shared_kv:
                proposer = _SharedKVProposer(self.drafter, target, self.eos, self.temperature, gen,
                                             threshold=self.draft_threshold)
            else:
                kind = _FeatureProposer if is_feature_drafter(self.drafter) else _SameVocabProposer
                proposer = kind(self.drafter, self.eos, self.temperature, gen, capacity=capacity,
                                threshold=self.draft_threshold)
        if self.lookup:
            proposer = _LookupProposer(proposer, self.lookup, self.eos)
        return proposer

    def _decode(self, target, proposer, prompt: list[int], max_new_tokens: int, gen, t0: float) -> DecodeResult:
        """Draft, verify, keep what the target agrees with, until max_new_tokens or an end token."""
        features = getattr(proposer, "reads", None)  # a feature drafter: the target also returns its features
        ids = list(prompt)
        res = DecodeResult(tokens=[])
        while len(res.tokens) < max_new_tokens:
            room = max_new_tokens - len(res.tokens)
            n = min(self.gamma, room - 1)
            drafts, qs = proposer.propose(ids, n) if (proposer is not None and n > 0) else ([], None)
            cached_before = len(target.ids)
            logits = target.forward(ids + drafts, keep=len(drafts) + 1, hidden=features or False)
            if features:
                logits, feats = logits
            res.target_passes += 1
            n_acc, nxt = self._verify(logits, drafts, qs, gen)
            new = drafts[:n_acc] + [nxt]
            for i, tok in enumerate(new):
                if tok in self.eos:
                    new = new[: i + 1]
                    break
            n_acc = len(new) - 1
            target.rollback(len(ids) + n_acc)
            if features:  # the target's features of the positions it keeps
                proposer.observe(feats[: len(ids) + n_acc - cached_before])
            ids.extend(new)
            if proposer is not None:
                proposer.accepted(ids[:-1])
                res.steps.append(Step(drafted=len(drafts), accepted=n_acc))
            res.tokens.extend(new)
            if res.target_passes == 1:
                synchronize(self.target.device)
                res.first_step_seconds, res.first_step_tokens = time.perf_counter() - t0, len(new)
            if new[-1] in self.eos:
                break
        synchronize(self.target.device)
        res.seconds = time.perf_counter() - t0
        res.looked_up = getattr(proposer, "looked_up", 0)
        return res

    def _verify(self, logits: torch.Tensor, drafts: list[int], qs, gen) -> tuple[int, int]:
        """Return (number of accepted drafts, next token from the target)."""
        if self.temperature == 0:
            choice = logits.argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == choice[n]:
                n += 1
            return n, choice[n]
        p = _probs(logits.cpu(), self.temperature)
        for i, d in enumerate(drafts):
            q_d = float(qs[i][d]) if qs is not None else 1.0
            r = float(torch.rand((), generator=gen))
            if r < min(1.0, float(p[i, d]) / q_d):
                continue
            if qs is not None:
                resid = torch.clamp(p[i] - qs[i], min=0)
            else:
                resid = p[i].clone()
                resid[d] = 0
            total = resid.sum()
            resid = resid / total if total > 0 else p[i]
            return i, int(torch.multinomial(resid, 1, generator=gen))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))


@torch.inference_mode()
def hf_assisted_generate(target, drafter, prompt: list[int], *, gamma: int, max_new_tokens: int,
                         target_tokenizer=None, drafter_tokenizer=None,
                         confidence_threshold: float = 0.0) -> DecodeResult:
    """HF `generate(assistant_model=...)` with γ fixed (schedule "constant"), greedy; `confidence_threshold` > 0 is
    HF's own dynamic draft length (`assistant_confidence_threshold`: γ is then the maximum).

    Counts the target's forward calls with a hook, so its MAL is measured the same way as ours.
    """
    if is_feature_drafter(drafter):
        from sd2.errors import UserError

        raise UserError("HF assisted generation cannot run a feature drafter (it reads the target's hidden states, "
                        "which HF's assistant API does not pass); compare it with sd2's engine")
    cfg = drafter.generation_config
    saved = (cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold)
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = (
        gamma, "constant", confidence_threshold)
    calls = [0]
    hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        synchronize(target.device)
        t0 = time.perf_counter()
        kwargs = {}
        if target_tokenizer is not None and drafter_tokenizer is not None:
            kwargs = {"tokenizer": target_tokenizer, "assistant_tokenizer": drafter_tokenizer}
        inp = torch.tensor([prompt], dtype=torch.long, device=target.device)
        with wide_head(drafter):  # HF's assistant needs full-vocabulary logits
            out = target.generate(inp, attention_mask=torch.ones_like(inp), assistant_model=drafter,
                                  do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
        synchronize(target.device)
        secs = time.perf_counter() - t0
    finally:
        hook.remove()
        cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = saved
    return DecodeResult(tokens=out[0, len(prompt):].tolist(), target_passes=calls[0], seconds=secs)
