"""Images built to cost a decoder far more than their size: the attacks of issue 8.

All are generated in milliseconds and never hold their decoded size in memory; none is
committed. The deflated DICOM bomb is in dicom_factory (deflated_dicom_bomb).
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib

from PIL import Image

# PNG colour types (PNG spec, 11.2.2).
GREY, RGB, GREY_ALPHA, RGBA = 0, 2, 4, 6
_SAMPLES = {GREY: 1, RGB: 3, GREY_ALPHA: 2, RGBA: 4}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour_type: int = GREY) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@functools.cache
def black_png(
    width: int, height: int, bit_depth: int = 8, colour_type: int = GREY, rows_per_block: int = 100
) -> bytes:
    """A valid, all-black `width` x `height` PNG, small whatever its size.

    One block of rows (filter byte 0 + zero samples each) is deflated once with a full
    flush, so it has no back references out of itself, and repeated; the Adler-32 of the
    zlib stream is computed over the whole."""
    row = 1 + width * _SAMPLES[colour_type] * bit_depth // 8
    blocks, rest = divmod(height, rows_per_block)
    block = b"\x00" * row * rows_per_block
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = end.compress(b"\x00" * row * rest) + end.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(b"\x00" * row * rest, adler)
    stream = b"\x78\xda" + piece * blocks + tail + struct.pack(">I", adler)
    return png(width, height, stream, bit_depth, colour_type)


def png_rgba16(side: int = 6320) -> bytes:
    """The issue's PNG: 16-bit RGBA at 6320x6320, 39.9 M pixels (under MAX_PIXELS), which
    decodes to 320 MB of samples; about 330 KB."""
    return black_png(side, side, 16, RGBA)


# Entropy-coded data ends at the first FF not followed by 00, a restart marker or FF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every SOS segment and its entropy-coded data."""
    spans, position = [], 2
    while position + 4 <= len(data) and data[position + 1] != 0xD9:
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        end = position + 2 + length
        if data[position + 1] == 0xDA:
            end = _NEXT_MARKER.search(data, end).start()
            spans.append((position, end))
        position = end
    return spans


@functools.cache
def progressive_jpeg(side: int = 4096, scans: int = 500) -> bytes:
    """A progressive grey JPEG of side x side px whose last scan (an AC refinement pass
    over every block) is repeated until it has `scans` scans. libjpeg only warns about the
    repeated progression and decodes every scan, each over the whole coefficient buffer:
    the issue's file (110 KB, ~500 scans) took 13 s. This one: ~80 KB at the defaults."""
    flat = Image.new("L", (side, side), 128)
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    spans = _scans(data)
    if scans < len(spans):
        raise ValueError(f"a progressive JPEG has at least {len(spans)} scans")
    start, end = spans[-1]
    return data[:end] + data[start:end] * (scans - len(spans)) + b"\xff\xd9"


def twenty_byte_jpeg() -> bytes:
    """JPEG magic, a DQT marker and 16 zero bytes. Pillow cannot identify it, and its
    message names the BytesIO it read and its address: `cannot identify image file
    <_io.BytesIO object at 0x7f...>`."""
    return b"\xff\xd8\xff\xdb" + b"\x00" * 16
