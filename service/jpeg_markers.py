"""What a JPEG will cost to decode, read from its markers before any decoding.

A progressive JPEG is decoded scan by scan, and every scan passes over the whole image's
coefficient buffer: decoding time grows with scans x pixels. Real encoders write few scans
(libjpeg's default progression: 6 for grey, 10 for colour; mozjpeg about 10), while a
crafted file of 100 KB can hold hundreds of tiny scans and take many seconds. Counting the
start-of-scan (SOS) markers is cheap: segment lengths are followed, and entropy-coded data
is skipped with one regular-expression search per scan (0xFF inside it is always stuffed
as FF 00 or is a restart marker FF D0..D7).
"""

from __future__ import annotations

import re

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Markers without a length field: TEM and the restart markers RST0..RST7.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# The next marker after entropy-coded data: FF followed by anything but a stuffed 00, a
# restart marker or another FF (fill byte).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def count_jpeg_scans(data: bytes, stop_above: int | None = None) -> int:
    """The number of SOS markers of the JPEG in `data` (counting stops once it exceeds
    `stop_above`). Structure the decoder would reject anyway just ends the count."""
    if data[:2] != b"\xff\xd8":
        return 0
    scans, position, end = 0, 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            # Garbage between segments: libjpeg skips it to the next marker, so do we.
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            break
        position += 2 + length
        if marker == _SOS:
            scans += 1
            if stop_above is not None and scans > stop_above:
                break
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
    return scans
