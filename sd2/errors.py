"""One exception type for bad user input, so every entry point can print one line and exit 2."""

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """Bad input the user can fix: the message names the field and the fix, on one line."""


# What a schema regex means, in words (filled by sd2.config beside the types that carry the regex).
PATTERN_HINTS: dict[str, str] = {}


def pydantic_message(exc: Exception) -> str:
    """Turn a pydantic ValidationError into one line naming each bad field."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0]
    parts = []
    for err in errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "config"
        msg = err.get("msg", "invalid value")
        pattern = (err.get("ctx") or {}).get("pattern")
        if err.get("type") == "string_pattern_mismatch" and pattern in PATTERN_HINTS:
            msg = f"use {PATTERN_HINTS[pattern]}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{field.replace('_', '-')}: {msg} (got {err.get('input')!r})")
    return "; ".join(parts)


_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def storage_error(exc: BaseException, path=None, prefer_path: bool = False) -> OSError | None:
    """The disk-full or permission error behind `exc`, as an OSError naming a path, or None.

    Writers outside Python's io (safetensors' Rust code, Arrow) raise their own types with the OS error only
    in the message; the cause chain is searched too, so a wrapped error is still recognised."""
    seen, hops = exc, 0
    while seen is not None and hops < 10:
        code = getattr(seen, "errno", None)
        if not isinstance(code, int):
            m = _OS_ERROR.search(str(seen))
            code = int(m.group(1) or m.group(2)) if m else None
        if code in STORAGE_ERRNOS:
            named = getattr(seen, "filename", None)
            where = (str(path) if path else named) if prefer_path else (named or (str(path) if path else None))
            return OSError(code, os.strerror(code), where)
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return None


@contextmanager
def writing(tmp, out):
    """Around writing `tmp` (later renamed to `out`; None: nothing to clean): on any failure remove `tmp`, so
    nothing half-written stays, and turn disk-full / permission errors into one OSError naming `out`."""
    try:
        yield
    except BaseException as exc:
        if tmp is not None and Path(tmp).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = storage_error(exc, out, prefer_path=True) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from exc
        raise
