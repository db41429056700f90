"""service.safe_text: what a client sent, or a library said, made safe to answer with."""

from __future__ import annotations

from service.safe_text import MAX_FILENAME_CHARS, clean_filename, redact
from tests.support.leaks import leaks


def test_filenames_lose_control_and_bidi_characters() -> None:
    # U+202E (RLO) makes "chest\u202egpj.exe" display as "chestexe.jpg".
    assert clean_filename("chest\u202egpj.exe") == "chestgpj.exe"
    every_bidi = "".join(
        chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
    )
    assert clean_filename(f"a{every_bidi}b.dcm") == "ab.dcm"
    assert clean_filename("x\x00y\r\nz\x1b[31m.png") == "xyz[31m.png"
    assert clean_filename("zero\u200bwidth.jpeg") == "zerowidth.jpeg"  # Cf as well
    assert clean_filename("Röntgen 胸部.jpeg") == "Röntgen 胸部.jpeg"  # letters stay
    assert len(clean_filename("x" * 2000 + ".jpeg")) == MAX_FILENAME_CHARS
    assert clean_filename(None) is None
    assert clean_filename("\u202e\x00 ") is None


def test_redact_removes_reprs_addresses_paths_and_tracebacks() -> None:
    cases = [
        "cannot identify image file <_io.BytesIO object at 0x7fa8a1b2c3d0>",
        "onnxruntime could not load /app/models/default/model.onnx: bad",
        "failed at C:\\models\\x.onnx",
        'boom\nTraceback (most recent call last):\n  File "/usr/lib/x.py", line 3, in f',
        "handle 0xdeadbeef went away",
    ]
    for message in cases:
        cleaned = redact(message)
        assert cleaned and not leaks(cleaned), (message, cleaned)
    # Our own messages pass unchanged.
    for message in (
        "not a JPEG, PNG or DICOM file (unrecognised content)",
        "image is 20x20 px; at least 32 px per side is needed",
        "at most 1 file(s) per request",
        "send JPEG/PNG/DICOM",
    ):
        assert redact(message) == message
    assert len(redact("x " * 1000)) <= 500
    assert "\n" not in redact("line one\nline two")
