"""What must never appear in an error message (issue 8, item 7): object reprs, memory
addresses, file system paths, traceback text."""

from __future__ import annotations

import re

LEAK_PATTERNS: dict[str, re.Pattern[str]] = {
    "memory address": re.compile(r"\b0x[0-9a-fA-F]+"),
    "object repr": re.compile(r"object at|<[\w.]+ (?:object|image)\b"),
    "absolute path": re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+|\b[A-Za-z]:\\"),
    "traceback": re.compile(r"Traceback|File \"|line \d+, in "),
}


def leaks(message: str) -> list[str]:
    """The names of the patterns `message` contains (empty when it is clean)."""
    return [name for name, pattern in LEAK_PATTERNS.items() if pattern.search(message)]
