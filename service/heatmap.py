"""The class activation map as a PNG sized to the original image, ready to overlay.

The `cam` output of a format 2 bundle is, per position of the last convolutional
feature map, that position's contribution to the positive-class logit difference (its
mean over positions is log P(positive)/P(negative) for a two-label model). Shown here:
the positive part, divided by its maximum (so the strongest evidence for pneumonia is 1;
an image with no positive contribution gives an empty map), in 16 levels.

The PNG is a 4-bit palette image: level k of 0..15 is the colour `PALETTE[k]` with alpha
k * 17 (level 0 fully transparent), so it can be drawn straight over the radiograph.
Cheap on purpose (explain=true should cost little more than a plain prediction): the map
is resized with Pillow (bilinear) to at most 256 px and quantised, then enlarged to the
original size with nearest-neighbour, which a 16-level smooth map does not show. The PNG
is written here rather than by Pillow: a row repeated by the enlargement is stored with
PNG's "Up" filter as zeros, which zlib's run-length strategy compresses at memory speed.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

LEVELS = 16
SMOOTH_SIDE = 256
PREVIEW_SIDE = 1024
MEDIA_TYPE = "image/png"

# Transparent -> blue -> cyan -> yellow -> red, 16 steps (a "jet"-like ramp).
_RAMP = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)


def _palette() -> list[int]:
    positions = np.linspace(0, len(_RAMP) - 1, LEVELS)
    colours = [
        np.rint(
            _RAMP[int(np.floor(p))]
            + (p - np.floor(p))
            * (_RAMP[min(int(np.floor(p)) + 1, len(_RAMP) - 1)] - _RAMP[int(np.floor(p))])
        )
        for p in positions
    ]
    return [int(v) for colour in colours for v in colour]


PALETTE = _palette()
ALPHA = bytes(k * 255 // (LEVELS - 1) for k in range(LEVELS))


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Positive part of the map divided by its maximum: float64 in [0, 1]."""
    values = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, None)
    peak = float(values.max()) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def smooth_levels(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """The normalised map resized (bilinear) to the image's aspect, at most SMOOTH_SIDE
    px, as levels 0..LEVELS-1 (uint8)."""
    unit = normalise_cam(cam)
    scale = min(1.0, SMOOTH_SIDE / max(width, height))
    smooth_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    smooth = Image.fromarray(unit.astype(np.float32), "F").resize(
        smooth_size, Image.Resampling.BILINEAR
    )
    values: NDArray[np.float32] = np.asarray(smooth, dtype=np.float32)
    return np.clip(np.rint(values * (LEVELS - 1)), 0, LEVELS - 1).astype(np.uint8)


def heatmap_levels(cam: np.ndarray, width: int, height: int) -> Image.Image:
    """The heatmap as a Pillow palette image of width x height (what the PNG holds)."""
    image = Image.fromarray(smooth_levels(cam, width, height), "P")
    image.putpalette(PALETTE)
    return image.resize((width, height), Image.Resampling.NEAREST)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def palette_png(levels: np.ndarray, width: int, height: int) -> bytes:
    """A 4-bit palette PNG of width x height from smaller `levels`, nearest-neighbour."""
    small_height = levels.shape[0]
    wide = np.asarray(
        Image.fromarray(levels).resize((width, small_height), Image.Resampling.NEAREST)
    )
    if width % 2:
        wide = np.pad(wide, ((0, 0), (0, 1)))
    packed = (wide[:, 0::2] << 4) | wide[:, 1::2]
    source = ((np.arange(height) + 0.5) * small_height / height).astype(np.intp)
    fresh = np.ones(height, dtype=bool)
    fresh[1:] = source[1:] != source[:-1]
    scanlines = np.zeros((height, packed.shape[1] + 1), dtype=np.uint8)
    scanlines[fresh, 1:] = packed[source[fresh]]  # filter 0 (None): the row itself
    scanlines[~fresh, 0] = 2  # filter 2 (Up): same as the row above, all zeros
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = compressor.compress(scanlines.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 4, 3, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", bytes(PALETTE)),
            _chunk(b"tRNS", ALPHA),
            _chunk(b"IDAT", idat),
            _chunk(b"IEND", b""),
        )
    )


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_payload(cam: np.ndarray, width: int, height: int) -> dict[str, Any]:
    png = palette_png(smooth_levels(cam, width, height), width, height)
    return {
        "media_type": MEDIA_TYPE,
        "width": width,
        "height": height,
        "data": base64.b64encode(png).decode("ascii"),
    }


def preview_payload(grey: np.ndarray) -> dict[str, Any]:
    """A greyscale PNG of the decoded image (longest side <= PREVIEW_SIDE), for what a
    browser cannot show itself (DICOM)."""
    image = Image.fromarray(grey)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    return {
        "media_type": MEDIA_TYPE,
        "width": image.size[0],
        "height": image.size[1],
        "data": _png(image),
    }
