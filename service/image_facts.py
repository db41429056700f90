"""What the input gate needs to know about an upload besides its model input.

    read_facts(bytes) -> ImageFacts(width, height, colour_share, dicom tags)

Read from the container's header (and, for colour images only, a small thumbnail), so a
greyscale radiograph costs a header parse. Never raises: the decoder in
service.preprocessing has already said whether the bytes are a usable image; a fact that
cannot be read here is None and its check is skipped.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from service.preprocessing import DICOM, sniff_format

if TYPE_CHECKING:
    from pydicom import Dataset

# A pixel counts as coloured when max(R, G, B) - min(R, G, B) exceeds this (of 255):
# JPEG chroma noise on a greyscale radiograph stays far below it.
COLOURED_PIXEL_CHROMA = 40
THUMBNAIL_SIDE = 128
# Pillow modes that can hold colour; everything else (L, I;16, 1, LA, ...) is grey.
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA"})
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TAG_VALUE = re.compile(r"[^A-Z0-9 _-]")


@dataclass(frozen=True)
class DicomTags:
    """The few tags that say what a DICOM image shows; upper case, trimmed, or None."""

    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None


@dataclass(frozen=True)
class ImageFacts:
    width: int | None  # upright, at the original resolution
    height: int | None
    colour_share: float  # share of clearly coloured pixels, 0 for greyscale containers
    format: str | None
    dicom: DicomTags | None = None


def read_facts(data: bytes) -> ImageFacts:
    kind = sniff_format(data)
    try:
        if kind == DICOM:
            return _dicom_facts(data)
        return _pillow_facts(data, kind)
    except Exception:  # noqa: BLE001 - untrusted bytes; the decoder reports real errors
        return ImageFacts(None, None, 0.0, kind)


def colour_share(rgb: np.ndarray) -> float:
    """Share of pixels of an (H, W, 3) array whose chroma exceeds COLOURED_PIXEL_CHROMA."""
    values = rgb.astype(np.int16, copy=False)
    chroma = values.max(axis=-1) - values.min(axis=-1)
    return float(np.mean(chroma > COLOURED_PIXEL_CHROMA)) if chroma.size else 0.0


def _pillow_facts(data: bytes, kind: str | None) -> ImageFacts:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image: Image.Image = Image.open(io.BytesIO(data))
        width, height = image.size
        if image.getexif().get(0x0112, 1) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        share = 0.0
        if image.mode in _COLOUR_MODES:
            if image.format == "JPEG":
                image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            share = colour_share(np.asarray(image))
    return ImageFacts(width, height, share, kind)


def _tag(dataset: Dataset, name: str) -> str | None:
    value = dataset.get(name)
    if value is None:
        return None
    text = _TAG_VALUE.sub("", str(value).strip().upper())[:16]
    return text or None


def _dicom_facts(data: bytes) -> ImageFacts:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photometric_probe = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        photometric = str(photometric_probe.get("PhotometricInterpretation", "")).upper()
        share = 0.0
        dataset = photometric_probe
        if photometric and not photometric.startswith("MONOCHROME"):
            # A colour DICOM (a photo, a screenshot): look at its pixels, subsampled.
            dataset = pydicom.dcmread(io.BytesIO(data))
            pixels = np.asarray(dataset.pixel_array)
            if pixels.ndim == 3 and pixels.shape[-1] == 3:
                if photometric.startswith("YBR"):
                    from pydicom.pixels.processing import convert_color_space

                    pixels = convert_color_space(pixels, photometric, "RGB")
                step = max(1, max(pixels.shape[:2]) // THUMBNAIL_SIDE)
                sample = pixels[::step, ::step]
                if sample.dtype != np.uint8:
                    sample = sample.astype(np.float64) * 255.0 / max(1, sample.max())
                share = colour_share(np.asarray(sample, dtype=np.uint8))
    tags = DicomTags(
        modality=_tag(dataset, "Modality"),
        body_part=_tag(dataset, "BodyPartExamined"),
        view_position=_tag(dataset, "ViewPosition"),
    )
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    return ImageFacts(
        int(columns) if columns else None, int(rows) if rows else None, share, DICOM, tags
    )
