"""A settings object that fails validation, said in one line per setting.

`PORT=70000` or `LOG_LEVEL=verbose` is a mistake of the person starting the service; they
need the setting's name (as they typed it: the environment variable) and what it accepts,
not pydantic's traceback.
"""

from __future__ import annotations

from pydantic import ValidationError


def settings_error_lines(exc: ValidationError) -> list[str]:
    """`PORT=70000 is not allowed: Input should be less than or equal to 65535`, one per
    invalid setting."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        value = error.get("input")
        shown = f"{name}={value}" if isinstance(value, str | int | float) else name
        lines.append(f"{shown} is not allowed: {message}")
    return lines
