"""Giving decode memory back to the operating system (glibc's malloc only).

With glibc's defaults a served process keeps what a large decode freed: after a large
block is freed, the mmap threshold rises dynamically (up to 32 MiB), so the next
images' arrays come from the heap and arenas, and freed heap memory is only returned when
its top is free. Every decode thread also gets its own arena. So RSS climbs with each
large upload and stays there (the issue measured 1.5-1.9 GB after the bombs).

`tune()` fixes the thresholds (a fixed value turns the dynamic adjustment off), so large
arrays are always mmapped and unmapped when freed, and caps the arenas; `trim()` returns
free heap pages (malloc_trim) and is called after large decodes. Both are no-ops where
the C library is not glibc. Environment variables the operator sets (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, read by glibc at start-up, e.g. in
Dockerfile.api) win over these defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("pneumoscreen.allocator")

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Allocations of at least this size are mmapped (and unmapped when freed): a 1024x1024
# 8-bit image and larger. glibc's default starts at 128 KiB but grows to 32 MiB.
MMAP_THRESHOLD = 1024 * 1024
# Free memory at the top of the heap beyond this is returned at once.
TRIM_THRESHOLD = 8 * 1024 * 1024
# Two arenas are enough for decode threads that mostly wait on C code.
ARENA_MAX = 2

_ENV_OF = {
    _M_ARENA_MAX: "MALLOC_ARENA_MAX",
    _M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
    _M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def tune() -> dict[str, int]:
    """Set the thresholds and the arena cap that the environment does not set; return
    what was set (empty where glibc is absent)."""
    if _LIBC is None:
        return {}
    applied: dict[str, int] = {}
    for parameter, value in (
        (_M_ARENA_MAX, ARENA_MAX),
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        name = _ENV_OF[parameter]
        if name in os.environ:
            continue
        if _LIBC.mallopt(parameter, value) == 1:
            applied[name] = value
    log.debug("allocator tuned: %s", applied)
    return applied


def trim() -> bool:
    """Return free heap memory to the OS; True when some was released."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
