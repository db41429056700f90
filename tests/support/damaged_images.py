"""Damaged images for tests of the decoder and of the service's error paths."""

from __future__ import annotations

import io

from PIL import Image

# Offset 41 is the low byte of the first IFD entry's tag (Make). These three edits make
# Pillow's exif_transpose raise TypeError; (41, 28) instead makes it raise struct.error.
TYPE_ERROR_EDITS = ((41, 63), (67, 41), (167, 111))


def damaged_exif_jpeg(edits: tuple[tuple[int, int], ...] = TYPE_ERROR_EDITS) -> bytes:
    """A 64x64 JPEG with EXIF orientation 6 (and Make, XResolution, Software), then bytes
    of its EXIF block overwritten."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Acme"
    exif[0x011A] = 72.0
    exif[0x0131] = "x"
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    for offset, value in edits:
        data[offset] = value
    return bytes(data)
