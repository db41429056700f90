"""Text that came from outside (or from a library) made safe to put in an answer.

- `clean_filename`: a client's filename, echoed in batch results, without control
  characters or the bidirectional overrides that make `gpj.exe` read as `exe.jpg`
  (Trojan Source, CVE-2021-42574), cut to MAX_FILENAME_CHARS.
- `redact`: the last guard on every error message (service.errors): object reprs, memory
  addresses, file system paths and traceback text never reach a client, even when a
  message was built from a library's exception by mistake.
"""

from __future__ import annotations

import re
import unicodedata

MAX_FILENAME_CHARS = 255

# LRE, RLE, PDF, LRO, RLO (U+202A-202E), LRI, RLI, FSI, PDI (U+2066-2069), LRM, RLM, ALM.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def clean_filename(name: str | None) -> str | None:
    """The filename without control, format (bidi, zero-width) or unpaired surrogate
    characters, at most MAX_FILENAME_CHARS long; None when nothing is left."""
    if name is None:
        return None
    kept = "".join(
        char
        for char in name
        if char not in _BIDI and unicodedata.category(char) not in ("Cc", "Cf", "Cs")
    ).strip()
    return kept[:MAX_FILENAME_CHARS] or None


# `<_io.BytesIO object at 0x7fa8...>`, `<PIL.JpegImagePlugin.JpegImageFile image mode=L>`
_OBJECT_REPR = re.compile(r"<[^<>]{0,200}(?: object at | at 0x|ImageFile )[^<>]{0,200}>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{4,}\b")
# Absolute POSIX paths of two or more parts (/usr/lib/..., /tmp/x.dcm) and Windows paths.
_POSIX_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"]*")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*", re.DOTALL)
MAX_MESSAGE_CHARS = 500


def redact(message: str) -> str:
    """`message` with object reprs, addresses, paths and tracebacks replaced, on one
    line, at most MAX_MESSAGE_CHARS long."""
    text = _TRACEBACK.sub("(details in the server log)", message)
    text = _OBJECT_REPR.sub("<object>", text)
    text = _ADDRESS.sub("<address>", text)
    text = _POSIX_PATH.sub("<path>", text)
    text = _WINDOWS_PATH.sub("<path>", text)
    text = "".join(
        " " if unicodedata.category(char) in ("Cc", "Cf", "Cs") else char for char in text
    )
    return " ".join(text.split())[:MAX_MESSAGE_CHARS]
