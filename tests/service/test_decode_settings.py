"""The decode budget settings reach the decoder, and their error codes are documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import Settings
from service.errors import ERROR_CODES, image_error
from service.preprocessing import DecoderBusy, ImageTooComplex, ImageTooLarge

REPO = Path(__file__).resolve().parents[2]


def test_decode_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings().decode_limits()
    assert defaults.max_decoded_bytes == 64 * 1024 * 1024
    assert defaults.max_jpeg_scans == 32
    assert defaults.memory is not None
    assert (defaults.memory.capacity, defaults.memory.wait_s) == (512 * 1024 * 1024, 5.0)
    for name, value in {
        "MAX_DECODED_BYTES": "1000",
        "MAX_JPEG_SCANS": "7",
        "DECODE_MEMORY_BUDGET_BYTES": "2000",
        "DECODE_BUDGET_WAIT_S": "0.5",
    }.items():
        monkeypatch.setenv(name, value)
    limits = Settings().decode_limits()
    assert (limits.max_decoded_bytes, limits.max_jpeg_scans) == (1000, 7)
    assert limits.memory is not None
    assert (limits.memory.capacity, limits.memory.wait_s) == (2000, 0.5)
    # Each app gets its own budget; the limits still compare equal.
    assert Settings().decode_limits().memory is not limits.memory
    assert Settings().decode_limits() == limits


def test_server_busy_answers_with_retry_after() -> None:
    busy = image_error(DecoderBusy("busy"))
    assert (busy.status_code, busy.code) == (503, "server_busy")
    assert busy.headers is not None and int(busy.headers["Retry-After"]) > 0
    assert image_error(ImageTooLarge("x")).headers is None
    assert image_error(ImageTooComplex("x")).status_code == 422


def test_every_error_code_is_in_the_documented_table() -> None:
    table = (REPO / "docs" / "api.md").read_text()
    for code, (status, _) in ERROR_CODES.items():
        assert re.search(rf"^\| {status}\s+\| `{code}`\s+\|", table, re.MULTILINE), code
