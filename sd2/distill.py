"""Self-data distillation: the target regenerates (or rewrites, guided by the reference) seed responses,
so the drafter is trained on the target's own distribution.

Work in progress lives in `<out>.partial/` as JSONL shards written atomically; re-running the same
command resumes from the shards already there. The finished dataset is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from sd2.config import DistillConfig
from sd2.data import (Prompt, encode_prompt, file_digest, load_distilled, load_prompts,  # noqa: F401 - re-export
                      limit_applies, load_seed_mix, mix_digest)
from sd2.errors import UserError
from sd2.device import torch_threads
from sd2.fastpath import pack_fp16, require_cpu
from sd2.io import atomic_write_text, publish_dir, save_dataset, write_json
from sd2.models import check_output_dir, load_model, model_digest
from sd2.progress import bar as progress_bar
from sd2.specdec import eos_ids

log = logging.getLogger(__name__)

REWRITE_TEMPLATE = (
    "{prompt}\n\n---\nA reference answer to the request above:\n{reference}\n---\n\n"
    "Using the reference answer as a guide, respond to the request in your own words."
)
# Starts of user requests of the kinds Spec-Bench-style workloads ask for and a small chat model rarely writes
# unprompted (--magpie-openers tasks); the target completes each, so the requests stay its own.
TASK_OPENERS = (
    "Write a Python function that", "Fix the bug in this code:\n\n```", "Translate into French: \"",
    "Translate the following sentence into English: \"", "Summarize the following text in two sentences:\n\n",
    "Extract every name and date from this text:\n\n", "Pretend you are", "Write a short story about",
    "Write an email to", "Explain the difference between", "Solve step by step: ",
    "Read the passage and answer the question.\n\nPassage:", "What were the main causes of",
    "Give me three tips for", "Rewrite this paragraph so it is easier to read:\n\n",
)
COLUMNS = ("prompt", "response", "source_id")
TEACHER_COLUMNS = ("response_ids", "topk_ids", "topk_logits")  # with --store-topk: exact ids + the target's top-k


def request_text(p: Prompt, mode: str) -> str:
    """What the target is shown. The stored training prompt is always p.text (never the reference)."""
    if mode == "rewrite":
        return REWRITE_TEMPLATE.format(prompt=p.text, reference=(p.reference or "").strip())
    return p.text


def is_degenerate(token_ids: list[int], n: int = 4, min_ngrams: int = 24, max_repeat_share: float = 0.5) -> bool:
    """Degenerate repetition: most of the n-grams of a long response are repeats of earlier ones."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    if len(grams) < min_ngrams:
        return False
    return 1 - len(set(grams)) / len(grams) > max_repeat_share


def _left_padded(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model, tok, requests: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                   topk: int = 0, encoded: list[list[int]] | None = None) -> list[tuple]:
    """Left-padded batched generation with KV cache; returns (text, token ids, truncated, teacher) per request.

    Why not `model.generate`: it keeps computing every row until the longest one ends. Here a row leaves the batch
    (and the cache) as soon as it emits EOS, so each step costs what the unfinished rows need — answers vary from a
    few tokens to the cap, and that waste was most of the work. Greedy (temperature 0) gives `generate`'s rows
    (tested); sampling draws from softmax(logits / temperature) over the whole vocabulary.
    With `topk` > 0, `teacher` is the target's top-k (ids, logits) at every generated position (the EOS step
    included when the answer ended): the logits generation computes anyway, kept for KD so training never
    reruns the target; logits rounded to fp16 precision (what the packed path computes with).
    `encoded` gives the prompts as token ids instead of chat-templated text."""
    from transformers import DynamicCache

    encoded = encoded if encoded is not None else [encode_prompt(tok, r) for r in requests]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_padded(encoded, pad)
    ids, mask = ids.to(model.device), mask.to(model.device)
    rng = torch.Generator(device=model.device).manual_seed(seed)
    eos, n = eos_ids(model, tok), len(encoded)
    toks: list[list[int]] = [[] for _ in range(n)]
    teacher: list[tuple[list, list]] = [([], []) for _ in range(n)]  # per request: top-k ids, logits per step
    ended = [False] * n
    live = list(range(n))  # the request behind each batch row
    cache = DynamicCache(config=model.config)
    step_ids, positions = ids, (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng)[:, 0]
        else:
            nxt = logits.argmax(-1)
        if topk > 0:
            vals, top = logits.topk(min(topk, logits.shape[-1]), dim=-1)
            vals = vals.half().float()
        keep = []
        for row, (r, t) in enumerate(zip(live, nxt.tolist())):
            if topk > 0:
                teacher[r][0].append(top[row].tolist())
                teacher[r][1].append([round(v, 3) for v in vals[row].tolist()])
            if t in eos:
                ended[r] = True
            else:
                toks[r].append(t)
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch and the cache
            sel = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(sel)
            mask, nxt, live = mask[sel], nxt[sel], [live[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        step_ids, positions = nxt[:, None], mask.sum(-1, keepdim=True) - 1
    return [(tok.decode(toks[r], skip_special_tokens=True).strip(), toks[r],
             not ended[r] and len(toks[r]) >= max_new_tokens, teacher[r] if topk > 0 else None) for r in range(n)]


def _run_key(cfg: DistillConfig, target_digest: str, seed_digest: str) -> dict:
    key = {"target": cfg.target, "target_digest": target_digest, "prompts": str(cfg.prompts),
           "prompts_digest": seed_digest, "mode": cfg.mode,
           "limit": cfg.limit if limit_applies(str(cfg.prompts)) else None,
           "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
           "temperature": cfg.temperature, "seed": cfg.seed, "backend": cfg.backend}
    for extra in ("store_topk", "max_prompt_tokens"):
        if getattr(cfg, extra):
            key[extra] = getattr(cfg, extra)
    if cfg.magpie_openers != "none":
        key["magpie_openers"] = cfg.magpie_openers
    if cfg.fast_path != "none":
        key["fast_path"] = cfg.fast_path  # other numbers, other answers: never resume across paths
    if cfg.backend == "openai":
        key.update(served_model=cfg.served_model or cfg.target, api=cfg.api)
    return key


def _words(text: str) -> list[int]:
    """Stand-in token ids (word hashes) for the repetition filter when a server returns only text."""
    return [hash(w) for w in text.split()]


def _generator(cfg: DistillConfig, placement=None):
    """(generate(requests, seed) → [(text, token ids | None, truncated, error | None, teacher top-k | None)],
    target digest, info)."""
    if cfg.mode == "reference":
        return None, "none (reference answers, no generation)", {}
    if cfg.backend == "openai":
        from sd2.openai_client import OpenAIBackend

        served = cfg.served_model or cfg.target
        backend = OpenAIBackend(cfg.base_urls, served, api=cfg.api, api_key_env=cfg.api_key_env,
                                concurrency=cfg.concurrency, timeout=cfg.request_timeout, max_retries=cfg.max_retries)
        names = backend.check()

        def gen(requests, seed):
            return [(*r, None) for r in backend.generate(requests, max_new_tokens=cfg.max_new_tokens,
                                                         temperature=cfg.temperature, seed=seed)]
        return gen, f"served:{served}", {"served_model": served, "served_models": names, "base_urls": backend.urls}
    if placement is None:  # several workers: each loads the target on its own device (_worker)
        return None, model_digest(cfg.target), {}
    model, tok = load_model(cfg.target, allow_pickle=cfg.load.allow_pickle,
                            trust_remote_code=cfg.load.trust_remote_code, placement=placement)
    if cfg.fast_path == "fp16":
        pack_fp16(model)
    if tok is None:
        raise UserError(f"--target {cfg.target}: no tokenizer, cannot generate")

    def gen(requests, seed):
        return [(t, ids, tr, None, teacher) for t, ids, tr, teacher in generate_batch(
            model, tok, requests, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
            topk=cfg.store_topk)]
    openers = TASK_OPENERS if cfg.magpie_openers == "tasks" else ()
    gen.user_turns = lambda n, seed, progress=False: user_turns(model, tok, n, batch_size=cfg.batch_size, seed=seed,
                                                                openers=openers, progress=progress)
    return gen, model_digest(cfg.target), {}


def user_prefix(tok) -> list[int]:
    """Token ids of the chat template up to where a user's message starts (system turn included, if any)."""
    if not getattr(tok, "chat_template", None):
        raise UserError("--prompts magpie:N: the target's tokenizer has no chat template to write user turns from")
    marker = "\x00sd2-user-turn\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tok(text[:text.index(marker)], add_special_tokens=False)["input_ids"]


def user_turns(model, tok, n: int, *, batch_size: int, seed: int, max_new_tokens: int = 96,
               temperature: float = 1.0, openers: tuple[str, ...] = (), progress: bool = False) -> list[Prompt]:
    """Magpie: the target writes user requests itself, sampled from its chat template's user prefix — seeds from
    its own distribution with nothing downloaded. With `openers`, sample i starts its request with opener
    i mod (len + 1) (the last slot: none) and the target completes it: a small model left alone writes mostly one
    kind of request ("I'm looking for advice on …"). Unfinished, empty, degenerate and repeated turns are dropped."""
    prefix, seen, out = user_prefix(tok), set(), []
    starts = [tok(o, add_special_tokens=False)["input_ids"] for o in openers] + [[]]
    pbar = progress_bar(progress=progress, total=n, desc="magpie seeds", unit="request")
    for attempt in range(0, 4 * n, batch_size):  # at most 4n samples
        if len(out) >= n:
            break
        begun = [starts[(attempt + j) % len(starts)] for j in range(batch_size)]
        rows = generate_batch(model, tok, [""] * batch_size, encoded=[prefix + b for b in begun],
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + attempt)
        for b, (_, ids, truncated, _) in zip(begun, rows):
            text = tok.decode(b + ids, skip_special_tokens=True).strip()
            key = " ".join(text.lower().split())
            if truncated or len(ids) < 4 or is_degenerate(ids) or key in seen or len(out) >= n:
                continue
            seen.add(key)
            out.append(Prompt(f"magpie/{len(out)}", "magpie", text))
            pbar.update(1)
    pbar.close()
    if len(out) < n:
        log.warning("magpie: %d of %d self-written seeds kept (the rest were unfinished or repeated)", len(out), n)
    return out


def _check_seeds(cfg: DistillConfig, work: Path | None = None) -> tuple[list[Prompt], int]:
    """The seed prompts (file/hub sources of the mix, then the self-written ones already made in `work`) and how
    many self-written seeds the mix asks for."""
    prompts, n_magpie = load_seed_mix(cfg.prompts, limit=cfg.limit)
    if n_magpie and (cfg.backend != "hf" or cfg.mode != "regenerate"):
        raise UserError(f"--prompts {cfg.prompts}: self-written (magpie) seeds need --backend hf and --mode "
                        "regenerate (they have no reference answer)")
    if cfg.mode in ("rewrite", "reference"):
        missing = [p.id for p in prompts if not p.reference]
        if missing:
            raise UserError(f"--mode {cfg.mode}: {len(missing)} seed record(s) have no reference answer "
                            f"(first: {missing[0]}); use --mode regenerate or a seed file with answers")
    if cfg.magpie_openers != "none" and not n_magpie:
        raise UserError(f"--magpie-openers {cfg.magpie_openers}: the seed mix {cfg.prompts} has no self-written "
                        "seeds to start; add e.g. +magpie:240 to --prompts, or use --magpie-openers none")
    if work is not None and (work / "magpie.jsonl").exists():
        prompts += [Prompt(**json.loads(line)) for line in (work / "magpie.jsonl").read_text().splitlines()]
    return prompts, n_magpie


def _fitting(cfg: DistillConfig, prompts: list[Prompt]) -> list[Prompt]:
    """The seeds whose chat-templated request fits --max-prompt-tokens (all of them without it)."""
    if not cfg.max_prompt_tokens or not prompts:
        return prompts
    from sd2.models import load_tokenizer

    tok = load_tokenizer(cfg.target, trust_remote_code=cfg.load.trust_remote_code)
    return [p for p in prompts if len(encode_prompt(tok, request_text(p, cfg.mode))) <= cfg.max_prompt_tokens]


def _magpie_seeds(cfg: DistillConfig, gen, work: Path, n: int, where, progress: bool = False) -> None:
    """Write the self-written seeds once (the resumed run reads them back); several workers: made here first."""
    if n == 0 or (work / "magpie.jsonl").exists():
        return
    if gen is None:
        from sd2.device import Placement

        gen, _, _ = _generator(cfg, Placement(where.workers[0], where.dtype))
    log.info("magpie: the target writes %d seed requests", n)
    with torch_threads(cfg.threads):
        turns = gen.user_turns(n, cfg.seed + 7_919, progress)
    log.info("magpie: the target wrote %d seed requests", len(turns))
    atomic_write_text(work / "magpie.jsonl", "".join(json.dumps(vars(p)) + "\n" for p in turns))


def _placement(cfg: DistillConfig):
    """Device plan of the in-process backend: one worker per visible GPU unless --workers says otherwise."""
    from sd2 import device as devices
    from sd2.models import resolve_spec

    if cfg.store_topk and (cfg.backend != "hf" or cfg.mode == "reference"):
        raise UserError(f"--store-topk {cfg.store_topk}: only in-process generation (--backend hf, --mode regenerate "
                        "or rewrite) sees the target's logits; use --store-topk 0 (train with --loss kd and a live "
                        "teacher instead)")
    if cfg.backend != "hf" or cfg.mode == "reference":
        if cfg.workers > 1:
            raise UserError("--workers: only the in-process (hf) backend generates with workers; an OpenAI-compatible "
                            "server is scaled with --concurrency and several --base-url")
        return None
    pinned = cfg.device.startswith("cuda:") or cfg.device == "cpu"
    workers = cfg.workers if cfg.workers > 1 or pinned else None
    where = devices.resolve(cfg.device, cfg.dtype, lambda: resolve_spec(cfg.target, cfg.load.allow_pickle), workers)
    require_cpu(cfg.fast_path, where.device)
    return where


def _open_work(out: Path, key: dict) -> Path:
    """The `<out>.partial/` dir of this run (resumed when its arguments match); returns its shards dir."""
    work = out.with_name(out.name + ".partial")
    shards = work / "shards"
    state = work / "run.json"
    if work.exists():
        prev = json.loads(state.read_text()) if state.exists() else None
        if prev != key:
            raise UserError(f"{work}: holds an unfinished distillation with other arguments; "
                            "re-run with the same arguments to resume, or delete it")
        log.info("resuming from %s (%d shard(s) done)", work, len(list(shards.glob("*.jsonl"))))
    shards.mkdir(parents=True, exist_ok=True)
    write_json(key, state)
    return shards


def _run_shards(cfg: DistillConfig, prompts: list[Prompt], shards: Path, gen, shard_ids, bar) -> int:
    """Generate the given shards (skipping finished ones, retrying failed requests); returns generated tokens.
    Each batch's seed depends only on its shard and position, so any split over workers gives the same rows."""
    gen_tokens = 0
    # the server backend sends a whole shard at once (its concurrency bounds the requests in flight)
    step = cfg.shard_size if cfg.backend == "openai" else cfg.batch_size
    for s in shard_ids:
        shard_file = shards / f"shard-{s:05d}.jsonl"
        chunk = prompts[s * cfg.shard_size:(s + 1) * cfg.shard_size]
        rows: list[dict | None] = [None] * len(chunk)
        if shard_file.exists():
            rows = [json.loads(line) for line in shard_file.read_text().splitlines()]
            todo = [i for i, r in enumerate(rows) if r.get("error")]  # retry what failed last time
            bar.update(len(chunk) - len(todo))
            if not todo:
                continue
        else:
            todo = list(range(len(chunk)))
        # Batch prompts of similar length together (less left padding); rows keep the seed order.
        todo.sort(key=lambda i: len(request_text(chunk[i], cfg.mode)))
        for b in range(0, len(todo), step):
            idx = todo[b:b + step]
            batch = [chunk[i] for i in idx]
            if gen is None:
                gens = [(p.reference.strip(), [], False, None, None) for p in batch]
            else:
                gens = gen([request_text(p, cfg.mode) for p in batch], cfg.seed + s * 100_003 + b)
            for i, p, (text, toks, truncated, error, teacher) in zip(idx, batch, gens):
                ids = toks if toks is not None else _words(text)
                rows[i] = {"prompt": p.text, "response": text, "source_id": p.id, "category": p.category,
                           "truncated": truncated, "degenerate": is_degenerate(ids)}
                if teacher is not None:  # the exact ids and the target's top-k logits at each (for KD)
                    rows[i].update(response_ids=toks, topk_ids=teacher[0], topk_logits=teacher[1])
                gen_tokens += len(ids)
                if error:
                    rows[i]["error"] = error
                    log.warning("request for %s failed: %s", p.id, error)
            bar.update(len(batch))
            bar.set_postfix_str(f"{gen_tokens:,} tokens generated", refresh=False)
        atomic_write_text(shard_file, "".join(json.dumps(r) + "\n" for r in rows))
    return gen_tokens


def _worker(cfg_json: str, shards: str, shard_ids: list[int], device: str, dtype: str) -> int:
    """One generation worker (a spawned process): its own copy of the target on its device, its own shards."""
    from sd2.device import Placement

    cfg = DistillConfig.model_validate_json(cfg_json)
    prompts = _fitting(cfg, _check_seeds(cfg, Path(shards).parent)[0])
    gen, _, _ = _generator(cfg, Placement(device, dtype))
    with torch_threads(cfg.threads):
        silent = progress_bar(progress=True, desc="", disable=True)  # the parent counts finished shards
        return _run_shards(cfg, prompts, Path(shards), gen, shard_ids, silent)


def _run_workers(cfg: DistillConfig, shards: Path, n_shards: int, where, bar) -> int:
    """Shards dealt round-robin to one process per worker device; finished shards count on the bar as they land."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, wait

    devs = where.workers
    parts = [list(range(w, n_shards, len(devs))) for w in range(len(devs))]
    log.info("distilling with %d workers on %s", len(devs), ", ".join(devs))
    with ProcessPoolExecutor(len(devs), mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(_worker, cfg.model_dump_json(), str(shards), part, dev, where.dtype)
                for part, dev in zip(parts, devs) if part]
        pending = futs
        while pending:
            _, pending = wait(futs, timeout=2)
            bar.n = min(bar.total, len(list(shards.glob("shard-*.jsonl"))) * cfg.shard_size)
            bar.refresh()
        return sum(f.result() for f in futs)  # re-raises a worker's error


def _finish(cfg: DistillConfig, out: Path, shards: Path, key: dict, info: dict, n_seeds: int, gen_tokens: int,
            seconds: float) -> Path:
    """Filter the finished shards into the dataset and publish it atomically; the shards go afterwards."""
    rows = [json.loads(line) for f in sorted(shards.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    failed = [{"source_id": r["source_id"], "error": r["error"]} for r in rows if r.get("error")]
    if failed:
        raise UserError(f"{len(failed)} request(s) failed (first: {failed[0]['source_id']}: {failed[0]['error']}); "
                        f"the {len(rows) - len(failed)} finished ones are kept in {shards.parent} — re-run the same "
                        "command to retry the failed ones")
    kept, counts = _filter(rows, n_seeds)
    manifest = {**key, **info, "counts": counts, "generated_tokens": gen_tokens,
                "generation_seconds_this_run": round(seconds, 2),
                "generated_tokens_per_s_this_run": round(gen_tokens / seconds, 2) if seconds else None,
                "columns": list(COLUMNS) + ["category", "truncated"]
                + (list(TEACHER_COLUMNS) if cfg.store_topk else [])}
    with publish_dir(out) as tmp:  # on failure the finished shards stay for the re-run
        save_dataset(kept, tmp)
        write_json(manifest, tmp / "sd2_manifest.json")
    shutil.rmtree(shards.parent)
    return out


def _filter(rows: list[dict], n_seeds: int) -> tuple[list[dict], dict]:
    """Drop empty, degenerate and duplicate responses (truncated ones are kept and flagged)."""
    kept, seen = [], set()
    counts = {"seed_records": n_seeds, "empty": 0, "degenerate": 0, "duplicate": 0, "truncated_kept": 0}
    for r in rows:
        if not r["response"]:
            counts["empty"] += 1
            continue
        if r["degenerate"]:
            counts["degenerate"] += 1
            continue
        k = (r["prompt"], r["response"])
        if k in seen:
            counts["duplicate"] += 1
            continue
        seen.add(k)
        counts["truncated_kept"] += int(r["truncated"])
        kept.append({c: r[c] for c in (*COLUMNS, "category", "truncated", *TEACHER_COLUMNS) if c in r})
    if not kept:
        raise UserError(f"distillation produced no usable responses ({counts}); check the target and prompts")
    counts["kept"] = len(kept)
    return kept, counts


def survival(dataset: str | Path) -> dict[str, float]:
    """What the filter kept of a finished dataset (its manifest): seeds asked, answers kept, and what was dropped
    — how much of a base model's greedy output (repetition loops) is usable data."""
    man = json.loads((Path(dataset) / "sd2_manifest.json").read_text())
    c = man.get("counts", {})
    out = {k: float(c.get(k, 0)) for k in ("seed_records", "kept", "degenerate", "empty", "duplicate",
                                            "truncated_kept")}
    out["too_long_skipped"] = float(man.get("too_long_skipped", 0))
    out["generated_tokens"] = float(man.get("generated_tokens", 0))
    return out


def distill(cfg: DistillConfig, progress: bool = True) -> Path:
    """Run (or resume) self-data distillation; returns the finished dataset dir.

    Requests that fail (server backend) are recorded in their shard and retried on the next run of the same
    command; everything else is kept. With several workers (one per GPU, or --workers on the CPU) shards are
    dealt out to one process each; the merged dataset is the one a single worker makes.
    """
    out = Path(cfg.out)
    where = _placement(cfg)
    check_output_dir(out, cfg.overwrite)
    _, n_magpie = _check_seeds(cfg)
    seed_digest = mix_digest(cfg.prompts)
    many = where is not None and len(where.workers) > 1
    gen, target_digest, info = _generator(cfg, None if many else where)
    key = _run_key(cfg, target_digest, seed_digest)
    if where is not None and where.dtype != "float32":
        key["dtype"] = where.dtype  # other numbers, other answers: never resume across dtypes
    if where is not None:
        info = {**info, "device": where.describe(), "workers": len(where.workers)}
    shards = _open_work(out, key)
    t0 = time.perf_counter()
    _magpie_seeds(cfg, gen, shards.parent, n_magpie, where, progress)
    seeds, _ = _check_seeds(cfg, shards.parent)
    prompts = _fitting(cfg, seeds)
    info["too_long_skipped"] = len(seeds) - len(prompts)
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    pbar = progress_bar(progress=progress, total=len(prompts), desc=f"distill ({cfg.mode})", unit="prompt")
    if many:
        gen_tokens = _run_workers(cfg, shards, n_shards, where, pbar)
    else:
        with torch_threads(cfg.threads):
            gen_tokens = _run_shards(cfg, prompts, shards, gen, range(n_shards), pbar)
    pbar.close()
    return _finish(cfg, out, shards, key, info, len(prompts), gen_tokens, time.perf_counter() - t0)
