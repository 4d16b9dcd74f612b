"""Atomic publishing of results: a reader (or a re-run after a kill) never sees half a file or half a dir."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sd2.errors import writing

_PRINT = builtins.print  # sd2 is imported before any flow runs, so this is the interpreter's own print


def _finite(obj):
    """NaN/inf are not JSON: write null instead (e.g. acceptance at a position never drafted)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(None, path):  # mkstemp itself fails on a read-only or full disk
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with writing(tmp, path):
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results private to the writing user
        os.replace(tmp, path)
    return path


def write_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temp file + rename): a reader never sees half a result."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


@contextmanager
def publish_dir(out: str | Path):
    """Yield a fresh temp dir beside `out`; when the block succeeds it replaces `out` in one rename. On any
    failure the temp dir is removed (nothing half-written stays) and disk errors name `out` (sd2.errors)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(None, out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    with writing(tmp, out):
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)


def save_dataset(rows: list[dict], out: str | Path) -> None:
    """Save rows as a `datasets` dir. datasets fingerprints a new table with dill, which reads `dis` output from a
    captured stdout; under a print patched to log (Prefect's log_prints) that disassembly would land in the run's
    log instead, so the interpreter's print is put back while the table is built."""
    import datasets

    patched, builtins.print = builtins.print, _PRINT
    try:
        ds = datasets.Dataset.from_list(rows)
    finally:
        builtins.print = patched
    ds.save_to_disk(str(out))
