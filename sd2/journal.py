"""Offline journal for tracking calls: when the MLflow server is unreachable mid-run, calls are recorded under
<runs dir>/pending/ (files copied there) and replayed by `sd2 sync`, or automatically by the next call that finds
the server back. Run ids handed out meanwhile are "pending-<uuid>" placeholders, resolved on replay."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import pandas as pd

PENDING_PREFIX = "pending-"
_OPS: dict = {}  # op name → the function that talks to the server (registered by `journaled`)


def _pending_dir() -> Path:
    from sd2.tracking import runs_dir

    return runs_dir() / "pending"


def _journal() -> Path:
    return _pending_dir() / "journal.jsonl"


def _is_offline_error(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(exc)
    return any(t in text for t in ("Max retries exceeded", "Connection refused", "Failed to establish",
                                   "API request to", "Read timed out"))


def _record(op: str, kwargs: dict) -> str | None:
    entry_id = uuid.uuid4().hex
    files = _pending_dir() / "files" / entry_id
    kw = dict(kwargs)
    if isinstance(kw.get("records"), pd.DataFrame):
        files.mkdir(parents=True, exist_ok=True)
        kw["records"].to_csv(files / "records.csv", index=False)
        kw["records"] = str(files / "records.csv")
    if kw.get("files"):
        files.mkdir(parents=True, exist_ok=True)
        copied = []
        for f in kw["files"]:
            shutil.copy(f, files / Path(f).name)
            copied.append(str(files / Path(f).name))
        kw["files"] = copied
    result = f"{PENDING_PREFIX}{entry_id}" if op in ("start_parent", "log_drafter_run") else None
    _pending_dir().mkdir(parents=True, exist_ok=True)
    with _journal().open("a") as f:
        f.write(json.dumps({"op": op, "kwargs": kw, "result": result}, default=str) + "\n")
    return result


def _has_pending(kwargs: dict) -> bool:
    vals = [kwargs.get("parent_id"), kwargs.get("run_id"), *(kwargs.get("run_ids") or [])]
    return any(isinstance(v, str) and v.startswith(PENDING_PREFIX) for v in vals)


def journaled(op: str, fn, **kwargs):
    """Call the tracking server, or journal the call when the server is unreachable (or the call refers to a
    run that only exists in the journal so far). A journal left by an earlier outage is replayed first."""
    _OPS[op] = fn
    if _journal().exists():
        try:
            sync()
        except Exception:  # noqa: BLE001 - still offline: keep journaling
            pass
    if _has_pending(kwargs):
        return _record(op, kwargs)
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        if not _is_offline_error(exc):
            raise
        logging.getLogger(__name__).warning("MLflow unreachable (%s): %s kept in %s; `sd2 sync` sends it",
                                            exc.__class__.__name__, op, _pending_dir())
        return _record(op, kwargs)


def sync() -> int:
    """Replay the offline journal against the tracking server; returns the number of calls sent."""
    journal = _journal()
    if not journal.exists():
        return 0
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    ids_file = _pending_dir() / "resolved.json"
    resolved: dict = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    sent = 0
    import sd2.registry  # noqa: F401 - registers its ops
    import sd2.tracking  # noqa: F401

    fns = {**_OPS, **sd2.tracking.JOURNALED_OPS, **sd2.registry.JOURNALED_OPS}
    for i, e in enumerate(entries):
        if e.get("done"):
            continue
        kw = dict(e["kwargs"])
        for k in ("parent_id", "run_id"):
            if kw.get(k) in resolved:
                kw[k] = resolved[kw[k]]
        if kw.get("run_ids"):
            kw["run_ids"] = [resolved.get(r, r) for r in kw["run_ids"]]
        if isinstance(kw.get("records"), str):
            kw["records"] = pd.read_csv(kw["records"])
        out = fns[e["op"]](**kw)
        if e.get("result"):
            resolved[e["result"]] = out
            ids_file.write_text(json.dumps(resolved))
        e["done"] = True
        journal.write_text("".join(json.dumps(x, default=str) + "\n" for x in entries))
        sent += 1
    shutil.rmtree(_pending_dir(), ignore_errors=True)
    return sent
