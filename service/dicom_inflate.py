"""Deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99), inflated under a cap.

In a deflated file everything after the file meta group is one raw deflate stream.
pydicom inflates it whole, in one call, before anything can be checked: a 0.5 MB upload
becomes 0.5 GB (deflate reaches ~1000:1 on zeros). Here the stream is inflated a piece
at a time with zlib's `max_length`, and reading stops as soon as the output passes the
cap. The result is handed to pydicom as the same file in Explicit VR Little Endian, which
is what a deflated dataset is once inflated (PS3.5 A.5).

The file meta group (always Explicit VR Little Endian, PS3.10 7.1) is parsed here, not by
pydicom, so nothing large is allocated before the cap applies.
"""

from __future__ import annotations

import struct
import zlib

DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"

_PREAMBLE_END = 132  # 128-byte preamble + "DICM"
# Explicit VR elements with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_TRANSFER_SYNTAX = (0x0002, 0x0010)
_GROUP_LENGTH = (0x0002, 0x0000)
# Inflated output is produced in pieces of at most this size.
_PIECE = 1 << 20
# Compressed input is fed this much at a time.
_CHUNK = 1 << 16
# Deflate cannot expand more than ~1032:1; a bound on the output from the input size.
MAX_DEFLATE_RATIO = 1032


class InflateLimitExceeded(ValueError):
    """The inflated dataset is larger than the cap."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"the deflated DICOM dataset inflates to more than {cap:,} bytes")
        self.cap = cap


class BadFileMeta(ValueError):
    """The file meta group cannot be parsed."""


def _meta_elements(data: bytes) -> tuple[list[tuple[tuple[int, int], bytes, bytes]], int]:
    """The group 0002 elements after "DICM" as (tag, VR, value), and where they end."""
    elements: list[tuple[tuple[int, int], bytes, bytes]] = []
    position = _PREAMBLE_END
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(data):
                raise BadFileMeta("truncated file meta element")
            (length,) = struct.unpack_from("<I", data, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            start = position + 8
        end = start + length
        if length == 0xFFFFFFFF or end > len(data):
            raise BadFileMeta("file meta element runs past the end of the file")
        elements.append(((group, element), vr, data[start:end]))
        position = end
    return elements, position


def transfer_syntax(data: bytes) -> str | None:
    """The TransferSyntaxUID of the file meta group (None when there is none)."""
    try:
        elements, _ = _meta_elements(data)
    except BadFileMeta:
        return None
    for tag, _, value in elements:
        if tag == _TRANSFER_SYNTAX:
            return value.rstrip(b"\x00 ").decode("ascii", "replace")
    return None


def inflated_head(data: bytes, nbytes: int) -> bytes:
    """The first (at most) `nbytes` of a deflated file's inflated data set; b"" when the
    stream is broken."""
    try:
        _, dataset_start = _meta_elements(data)
    except BadFileMeta:
        return b""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    stream = memoryview(data)[dataset_start:]
    try:
        for offset in range(0, len(stream), _CHUNK):
            head += inflater.decompress(stream[offset : offset + _CHUNK], nbytes - len(head))
            if len(head) >= nbytes or inflater.eof:
                break
    except zlib.error:
        return b""
    return bytes(head)


# The Image Pixel module attributes (group 0028) that size the pixel data, US values but
# NumberOfFrames (IS, a decimal string).
_IMAGE_TAGS = {
    (0x0028, 0x0002): "samples",
    (0x0028, 0x0008): "frames",
    (0x0028, 0x0010): "rows",
    (0x0028, 0x0011): "columns",
    (0x0028, 0x0100): "bits_allocated",
}


def image_attributes(head: bytes) -> dict[str, int] | None:
    """Rows, columns, samples, bits allocated and frames from the start of an Explicit VR
    Little Endian data set, read before anything is inflated in full; None when they are
    not all found before the data ends or an element of undefined length (a sequence) is
    met. Tags are in ascending order, so reading stops at group 0028's end."""
    found: dict[str, int] = {"samples": 1, "frames": 1}
    position = 0
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group > 0x0028:
            break
        vr = head[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            return None
        name = _IMAGE_TAGS.get((group, element))
        value = head[start : start + length]
        try:
            if name == "frames":
                found[name] = int(value.strip(b"\x00 ") or b"1")
            elif name is not None and length >= 2:
                found[name] = struct.unpack_from("<H", value)[0]
        except ValueError:
            return None
        position = start + length
    if not {"rows", "columns", "bits_allocated"} <= found.keys():
        return None
    return found


def _encode(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", *tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", *tag, vr, len(value)) + value


def inflate_dicom(data: bytes, cap: int) -> bytes:
    """`data` itself unless it is a deflated DICOM; then the same file with its dataset
    inflated and its transfer syntax Explicit VR Little Endian. InflateLimitExceeded as
    soon as the inflated dataset passes `cap` bytes; zlib.error on a broken stream."""
    elements, dataset_start = _meta_elements(data)
    syntax = next((v for t, _, v in elements if t == _TRANSFER_SYNTAX), None)
    if syntax is None or syntax.rstrip(b"\x00 ").decode("ascii", "replace") != DEFLATED:
        return data

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces: list[bytes] = []
    total = 0
    stream = memoryview(data)[dataset_start:]
    # Input goes in small chunks so that `unconsumed_tail` (a copy) stays small too.
    for offset in range(0, len(stream), _CHUNK):
        pending: bytes | memoryview = stream[offset : offset + _CHUNK]
        while pending and not inflater.eof:
            piece = inflater.decompress(pending, min(_PIECE, cap + 1 - total))
            pending = inflater.unconsumed_tail
            total += len(piece)
            if total > cap:
                raise InflateLimitExceeded(cap)
            pieces.append(piece)
        if inflater.eof:
            break
    while not inflater.eof:
        # Output zlib still holds after the last input (bounded by its window).
        piece = inflater.decompress(b"", min(_PIECE, cap + 1 - total))
        if not piece:
            break  # a stream cut short: pydicom reports what it can of the rest
        total += len(piece)
        if total > cap:
            raise InflateLimitExceeded(cap)
        pieces.append(piece)

    uid = EXPLICIT_LITTLE.encode() + b"\x00"  # UI values are padded to an even length
    rest = b"".join(
        _encode(tag, vr, uid if tag == _TRANSFER_SYNTAX else value)
        for tag, vr, value in elements
        if tag != _GROUP_LENGTH
    )
    group_length = _encode(_GROUP_LENGTH, b"UL", struct.pack("<I", len(rest)))
    return b"".join([data[:_PREAMBLE_END], group_length, rest, *pieces])
