"""The class activation map as a PNG sized to the original image, ready to overlay.

The `cam` output of a format 2 bundle is, per position of the last convolutional
feature map, that position's contribution to the positive-class logit difference (its
mean over positions is log P(positive)/P(negative) for a two-label model). Shown here:
the positive part, divided by its maximum (so the strongest evidence for pneumonia is 1;
an image with no positive contribution gives an empty map), in 16 levels.

The PNG is a 4-bit palette image: level k of 0..15 is the colour `PALETTE[k]` with alpha
k * 17 (level 0 fully transparent), so it can be drawn straight over the radiograph.
Cheap on purpose: the map is resized with Pillow (bilinear) to at most 512 px, quantised,
then enlarged to the original size with nearest-neighbour, which a 16-level smooth map
does not show and which keeps the PNG small and fast to encode.
"""

from __future__ import annotations

import base64
import io
import zlib
from typing import Any

import numpy as np
from PIL import Image

LEVELS = 16
SMOOTH_SIDE = 512
PREVIEW_SIDE = 1024
MEDIA_TYPE = "image/png"

# Transparent -> blue -> cyan -> yellow -> red, 16 steps (a "jet"-like ramp).
_RAMP = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)


def _palette() -> list[int]:
    positions = np.linspace(0, len(_RAMP) - 1, LEVELS)
    colours = [np.rint(_RAMP[int(np.floor(p))] + (p - np.floor(p)) * (
        _RAMP[min(int(np.floor(p)) + 1, len(_RAMP) - 1)] - _RAMP[int(np.floor(p))]))
        for p in positions]
    return [int(v) for colour in colours for v in colour]


PALETTE = _palette()
ALPHA = bytes(k * 255 // (LEVELS - 1) for k in range(LEVELS))


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Positive part of the map divided by its maximum: float64 in [0, 1]."""
    values = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, None)
    peak = float(values.max()) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def heatmap_levels(cam: np.ndarray, width: int, height: int) -> Image.Image:
    """The normalised map as a 16-level palette image of width x height."""
    unit = normalise_cam(cam)
    scale = min(1.0, SMOOTH_SIDE / max(width, height))
    smooth_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    smooth = Image.fromarray(unit.astype(np.float32), "F").resize(
        smooth_size, Image.Resampling.BILINEAR)
    levels = np.clip(np.rint(np.asarray(smooth) * (LEVELS - 1)), 0, LEVELS - 1)
    image = Image.fromarray(levels.astype(np.uint8), "P")
    image.putpalette(PALETTE)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.NEAREST)
    return image


def _png(image: Image.Image, **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_payload(cam: np.ndarray, width: int, height: int) -> dict[str, Any]:
    image = heatmap_levels(cam, width, height)
    image.info.pop("transparency", None)
    return {"media_type": MEDIA_TYPE, "width": width, "height": height,
            "data": _png(image, bits=4, transparency=ALPHA)}


def preview_payload(grey: np.ndarray) -> dict[str, Any]:
    """A greyscale PNG of the decoded image (longest side <= PREVIEW_SIDE), for what a
    browser cannot show itself (DICOM)."""
    image = Image.fromarray(grey)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    return {"media_type": MEDIA_TYPE, "width": image.size[0], "height": image.size[1],
            "data": _png(image)}
