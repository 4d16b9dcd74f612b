"""Prompt sources: JSONL files in four formats (detected by keys), HF datasets, and chat templating."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sd2.errors import UserError

SPEC_BENCH = "spec_bench_questions.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    reference: str | None = None  # the seed's answer, when the source has one (rewrite mode)


def data_dir() -> Path:
    """$SD2_DATA_DIR, else ../shared/data beside the repo, else a clear error."""
    env = os.environ.get("SD2_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    raise UserError("no data folder: set SD2_DATA_DIR or pass --prompts FILE")


def default_prompts_file() -> Path:
    return data_dir() / SPEC_BENCH


def _record_to_prompt(rec: dict, idx: int, where: str) -> Prompt:
    if "turns" in rec:  # Spec-Bench / MT-Bench: first turn
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise UserError(f"{where}: 'turns' must be a non-empty list of strings")
        ref = rec.get("reference")
        return Prompt(str(rec.get("question_id", idx)), str(rec.get("category", "default")), turns[0],
                      ref[0] if isinstance(ref, list) and ref else None)
    if "question" in rec and "answer" in rec:  # GSM8K
        return Prompt(str(rec.get("id", idx)), "gsm8k", str(rec["question"]), str(rec["answer"]))
    if "instruction" in rec:  # Dolly
        ctx = str(rec.get("context") or "").strip()
        text = str(rec["instruction"]).strip()
        if ctx:
            text = f"{text}\n\n{ctx}"
        return Prompt(str(rec.get("id", idx)), str(rec.get("category", "dolly")), text,
                      str(rec["response"]) if rec.get("response") is not None else None)
    if "prompt" in rec:  # generic
        ref = rec.get("response", rec.get("reference"))
        return Prompt(str(rec.get("id", idx)), str(rec.get("category", "default")), str(rec["prompt"]),
                      str(ref) if ref is not None else None)
    raise UserError(
        f"{where}: unknown record format (keys {sorted(rec)}); expected Spec-Bench {{question_id, category, turns}}, "
        "GSM8K {question, answer}, Dolly {instruction, context, response} or {prompt}"
    )


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read every record of a JSONL prompts file; a malformed line raises with file and line number."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--prompts {path}: file not found")
    if path.is_dir():
        raise UserError(f"--prompts {path}: is a directory; give a JSONL file")
    out: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: malformed JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            p = _record_to_prompt(rec, len(out), where)
            if not p.text.strip():
                raise UserError(f"{where}: empty prompt text")
            out.append(p)
    if not out:
        raise UserError(f"--prompts {path}: file has no records")
    return out


def select(prompts: list[Prompt], categories: list[str] | None = None, limit: int | None = None) -> list[Prompt]:
    """Filter by category, then take `limit` prompts in turn from each category (so a small limit still covers all)."""
    if categories:
        known = sorted({p.category for p in prompts})
        bad = [c for c in categories if c not in known]
        if bad:
            raise UserError(f"--categories: unknown {', '.join(bad)}; known: {', '.join(known)}")
        prompts = [p for p in prompts if p.category in categories]
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise UserError("--limit: must be >= 1")
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    queues = list(by_cat.values())
    out: list[Prompt] = []
    i = 0
    while len(out) < limit:
        q = queues[i % len(queues)]
        k = i // len(queues)
        if k < len(q):
            out.append(q[k])
        i += 1
    return out


def load_prompts(source: str | Path | None = None, categories: list[str] | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file, an HF dataset id (users with a hub), or Spec-Bench by default."""
    if source is None:
        source = default_prompts_file()
    path = Path(source)
    if not path.exists() and "/" in str(source) and not str(source).startswith((".", "/", "~")):
        return select(_load_hf_dataset(str(source)), categories, limit)
    return select(read_prompts(path), categories, limit)


MAGPIE = "magpie"  # the seed source the target writes itself (from its chat template's user prefix)


def parse_seed_mix(spec: str) -> list[tuple[str, int | None]]:
    """`a.jsonl:800+b.jsonl:200+magpie:400` → [(source, limit)]: several seed sources in one string (so the Prefect
    form, the CLI and stage cache keys keep one field). A name that is not a file is looked up in the data dir."""
    parts = []
    for item in str(spec).split("+"):
        item = item.strip()
        src, sep, lim = item.rpartition(":")
        if not (sep and lim.isdigit()):
            src, lim = item, ""
        if not src:
            raise UserError(f"--prompts {spec}: empty source in the seed mix; write SOURCE[:LIMIT]+SOURCE[:LIMIT]")
        if lim and int(lim) < 1:
            raise UserError(f"--prompts {spec}: {item}: a limit must be >= 1")
        if src == MAGPIE and not lim:
            raise UserError(f"--prompts {spec}: say how many self-written seeds, e.g. magpie:400")
        if src != MAGPIE and not Path(src).exists():
            try:
                cand = data_dir() / src
            except UserError:
                cand = None
            src = str(cand) if cand is not None and cand.exists() else src
        parts.append((src, int(lim) if lim else None))
    return parts


def is_seed_mix(spec: str) -> bool:
    """A mix string (`a.jsonl:800+magpie:400`), not one file, hub id or model."""
    return "+" in spec or spec.startswith(MAGPIE + ":") or bool(re.search(r"\.jsonl?:\d+$", spec))


def load_seed_mix(spec: str, limit: int | None = None) -> tuple[list[Prompt], int]:
    """The file (or hub) seeds of a mix, each source with its own limit (`limit` caps a single source), and the
    number of self-written (magpie) seeds asked for."""
    parts = parse_seed_mix(spec)
    prompts, magpie = [], 0
    for src, lim in parts:
        if src == MAGPIE:
            magpie += lim or 0
            continue
        got = load_prompts(src, limit=lim if lim is not None else limit)
        if len(parts) > 1:  # ids stay unique across sources
            tag = Path(src).stem
            got = [Prompt(f"{tag}/{p.id}", p.category, p.text, p.reference) for p in got]
        prompts.extend(got)
    return prompts, magpie


def limit_applies(spec: str) -> bool:
    """Whether a distillation's --limit caps any source of these seeds: a mix whose every source names its own
    limit ignores it (so records do not show a cap that was not used)."""
    return not is_seed_mix(spec) or any(lim is None for src, lim in parse_seed_mix(spec) if src != MAGPIE)


def mix_digest(spec: str) -> str:
    """Digest of a seed mix: the spec and the bytes of every file in it (a single file: its own digest)."""
    if Path(str(spec)).is_file():
        return file_digest(spec)
    h = hashlib.sha256(str(spec).encode())
    for src, _ in parse_seed_mix(spec):
        if src != MAGPIE and Path(src).is_file():
            h.update(file_digest(src).encode())
    return h.hexdigest()


def _load_hf_dataset(dataset_id: str, split: str = "train") -> list[Prompt]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
        raise UserError(f"--prompts {dataset_id}: not a file and not a loadable HF dataset ({exc.__class__.__name__})")
    return [_record_to_prompt(dict(r), i, f"{dataset_id}[{i}]") for i, r in enumerate(ds)]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a user turn: the chat template (with generation prompt) when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def load_distilled(path: str | Path):
    """Load a distilled dataset dir, checking the columns training needs."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--data {path}: not a directory (expected the output of `sd2 distill`)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data {path}: not a datasets dir ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("prompt", "response") if c not in ds.column_names]
    if missing:
        raise UserError(f"--data {path}: missing column(s) {', '.join(missing)}; expected prompt, response")
    if len(ds) == 0:
        raise UserError(f"--data {path}: dataset is empty")
    return ds
