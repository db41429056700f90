"""Resident memory of a process we started, from /proc (Linux).

    VmRSS  resident set size now
    VmHWM  its peak ("high water mark") since start, or since `reset_peak`

`reset_peak` writes 5 to /proc/<pid>/clear_refs (Linux >= 4.0), which sets VmHWM back to
the current RSS, so one attack's own peak can be read.
"""

from __future__ import annotations

from pathlib import Path

MB = 1024 * 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


def peak_bytes(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> bool:
    """True when VmHWM was reset; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
