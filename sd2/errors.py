"""One exception type for bad user input, so every entry point can print one line and exit 2."""


class UserError(ValueError):
    """Bad input the user can fix: the message names the field and the fix, on one line."""


def pydantic_message(exc: Exception) -> str:
    """Turn a pydantic ValidationError into one line naming each bad field."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0]
    parts = []
    for err in errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "config"
        msg = err.get("msg", "invalid value")
        parts.append(f"{field.replace('_', '-')}: {msg} (got {err.get('input')!r})")
    return "; ".join(parts)
