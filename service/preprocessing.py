"""The one image pipeline shared by training, evaluation and serving.

Every image, whatever its container (JPEG, PNG, DICOM), goes through the same two steps:

    decode_grey(bytes)          -> uint8 greyscale array (H, W), upright, 0 = black
    to_model_input(grey, h, w)  -> uint8 array (h, w, 3), stretched to the model's size

Training reads its JPEGs with `load_model_input` exactly as the service reads an upload,
so the model never sees pixels prepared differently from the ones it is served
(train/serve skew is the classic bug of this field).

Nothing here knows about HTTP: errors carry a stable `code` the service maps to a status.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Stretch resize: the published 224 px training images were stretched, not letterboxed.
RESIZE_FILTER = Image.Resampling.BILINEAR

JPEG, PNG, DICOM = "jpeg", "png", "dicom"
SUPPORTED_FORMATS = frozenset({JPEG, PNG, DICOM})

# Magic numbers of what people actually send by mistake, so the error can name it.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", JPEG),
    (0, b"\x89PNG\r\n\x1a\n", PNG),
    (128, b"DICM", DICOM),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"%PDF", "pdf"),
    (0, b"\x1f\x8b", "gzip"),
)

# EXIF orientations 5..8 swap width and height.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageError(ValueError):
    """An input that cannot become a model input. `code` is stable and machine-readable."""

    code = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyImage(ImageError):
    code = "empty_file"


class UnsupportedImage(ImageError):
    code = "unsupported_media_type"


class CorruptImage(ImageError):
    code = "invalid_image"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class ImageTooSmall(ImageError):
    code = "image_too_small"


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against decompression bombs and inputs that are not radiographs."""

    max_pixels: int = 40_000_000
    min_side: int = 32
    allowed_formats: frozenset[str] = field(default=SUPPORTED_FORMATS)


DEFAULT_LIMITS = DecodeLimits()


def sniff_format(data: bytes) -> str | None:
    """The container format from the bytes themselves; never from a filename or header."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[8:12] == b"WEBP" and data[:4] == b"RIFF":
        return "webp"
    return None


def decode_grey(
    data: bytes,
    target_size: tuple[int, int] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Decode JPEG, PNG or DICOM bytes to an upright uint8 greyscale image (H, W).

    `target_size` (height, width) is a hint: JPEGs are then decoded at the smallest DCT
    scale that is still at least that large (Pillow's draft mode), which halves decode time
    for full-resolution radiographs without changing what the model sees at its size.
    """
    return decode_grey_with_header(data, target_size, limits)[0]


def decode_grey_with_header(
    data: bytes,
    target_size: tuple[int, int] | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, Dataset | None]:
    """`decode_grey`, plus the DICOM file's header (its dataset without the pixel data)
    from the same parse; None for JPEG and PNG. Reports (service/reports) need the
    patient, study and instance identifiers of the source image."""
    if not data:
        raise EmptyImage("the file is empty")
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedImage("not a JPEG, PNG or DICOM file (unrecognised content)")
    if kind not in limits.allowed_formats:
        if kind in SUPPORTED_FORMATS:
            raise UnsupportedImage(f"{kind.upper()} files are not accepted by this server")
        raise UnsupportedImage(f"{kind.upper()} files are not supported; send JPEG, PNG or DICOM")
    header = None
    if kind == DICOM:
        grey, header = _decode_dicom(data, limits)
    else:
        grey = _decode_pillow(data, target_size, limits)
    height, width = grey.shape
    if min(height, width) < limits.min_side:
        raise ImageTooSmall(
            f"image is {width}x{height} px; at least {limits.min_side} px per side is needed"
        )
    return grey, header


def to_model_input(grey: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stretch a greyscale image to (height, width) and repeat it into 3 uint8 channels."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    image = Image.fromarray(grey)
    if image.size != (width, height):
        image = image.resize((width, height), RESIZE_FILTER)
    resized = np.asarray(image, dtype=np.uint8)
    return np.repeat(resized[:, :, None], 3, axis=2)


def load_model_input(
    data: bytes, height: int, width: int, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Bytes of one image -> the uint8 (height, width, 3) array the model takes."""
    return to_model_input(decode_grey(data, (height, width), limits), height, width)


def load_model_input_with_header(
    data: bytes, height: int, width: int, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, Dataset | None]:
    """`load_model_input`, plus the DICOM header (None for JPEG/PNG), decoded once."""
    grey, header = decode_grey_with_header(data, (height, width), limits)
    return to_model_input(grey, height, width), header


# --- Pillow: JPEG and PNG -------------------------------------------------------------


def _decode_pillow(
    data: bytes, target_size: tuple[int, int] | None, limits: DecodeLimits
) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size[0], image.size[1], limits)
            if getattr(image, "n_frames", 1) > 1:
                raise UnsupportedImage("animated or multi-frame images are not supported")
            if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                raise UnsupportedImage(f"colour mode {image.mode} is not supported for radiographs")
            orientation = image.getexif().get(0x0112, 1)
            if image.format == "JPEG" and target_size is not None:
                height, width = target_size
                if orientation in _TRANSPOSED_ORIENTATIONS:
                    height, width = width, height
                image.draft("L", (width, height))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _pillow_to_grey(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(f"the image could not be decoded: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes
        # e.g. a damaged EXIF block makes ImageOps.exif_transpose raise TypeError or
        # struct.error: still a bad upload (4xx), never a server error.
        # Only the exception type: the message could quote an EXIF value (e.g. Artist).
        raise CorruptImage(f"the image could not be decoded ({type(exc).__name__})") from None


def _pillow_to_grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _rescale_to_uint8(np.asarray(image))
    if image.mode != "L":
        # Palette, RGB, RGBA, LA and 1-bit all have a defined luminance; alpha is ignored.
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


# --- DICOM ----------------------------------------------------------------------------


def _decode_dicom(data: bytes, limits: DecodeLimits) -> tuple[np.ndarray, Dataset]:
    # Imported here: pydicom is only needed when a DICOM file actually arrives.
    import pydicom

    # pydicom's warnings about malformed elements quote the element values (patient name
    # included) and also go to its logger: keep them out of our logs.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _decode_dicom_dataset(data, limits)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes
            # Only the exception type: a parser message could quote a (patient) value.
            raise CorruptImage(
                f"the DICOM file could not be read ({type(exc).__name__})"
            ) from None


def _decode_dicom_dataset(data: bytes, limits: DecodeLimits) -> tuple[np.ndarray, Dataset]:
    dataset = _read_dicom(data, limits)
    grey = _dicom_grey(dataset)
    # The header outlives the request's decode: drop the pixels (and pydicom's cached
    # array of them) so only the attributes stay in memory.
    del dataset.PixelData
    return grey, dataset


def _read_dicom(data: bytes, limits: DecodeLimits) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise CorruptImage(f"the DICOM file could not be read: {_short(exc)}") from None
    if "TransferSyntaxUID" not in dataset.file_meta:
        # "DICM" followed by bytes pydicom parsed leniently into nothing meaningful.
        raise CorruptImage("the DICOM file could not be read: no valid file meta information")
    if "PixelData" not in dataset:
        raise UnsupportedImage("the DICOM file holds no image (no PixelData)")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    # An RGB DICOM holds (and decodes to) three values per pixel: count them all.
    samples = max(1, int(dataset.get("SamplesPerPixel", 1) or 1))
    _check_pixels(columns, rows, limits, samples)
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise UnsupportedImage("multi-frame DICOM is not supported; send one frame")
    return dataset


def _dicom_grey(dataset: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise UnsupportedImage(
            f"DICOM transfer syntax {getattr(syntax, 'name', syntax)} cannot be decoded "
            f"by this server ({_short(exc)})"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        raise CorruptImage(f"the DICOM pixel data could not be decoded: {_short(exc)}") from None

    if photometric.startswith("MONOCHROME"):
        if pixels.ndim != 2:
            raise UnsupportedImage(f"unexpected DICOM pixel array shape {pixels.shape}")
        values = apply_modality_lut(pixels, dataset)
        values = apply_voi_lut(values, dataset)
        grey = _rescale_to_uint8(np.asarray(values))
        # MONOCHROME1 means the lowest value is white: invert so bone is bright as in training.
        return 255 - grey if photometric == "MONOCHROME1" else grey
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = Image.fromarray(_rescale_to_uint8(np.asarray(pixels)), "RGB")
        return np.asarray(rgb.convert("L"), dtype=np.uint8)
    raise UnsupportedImage(f"DICOM photometric interpretation {photometric} is not supported")


# --- helpers --------------------------------------------------------------------------


def _check_pixels(width: int, height: int, limits: DecodeLimits, samples: int = 1) -> None:
    """Reject before decoding. `samples` values per pixel (3 for RGB DICOM) count as that
    many pixels: the decoded array is that much larger."""
    if width <= 0 or height <= 0:
        raise CorruptImage("the image declares no pixels")
    count = width * height * samples
    if count > limits.max_pixels:
        per_pixel = f" x {samples} samples" if samples > 1 else ""
        raise ImageTooLarge(
            f"image is {width}x{height} px{per_pixel} ({count:,} values); "
            f"the limit is {limits.max_pixels:,} pixels"
        )


# Integer images whose value range spans at most this many levels (all 8-16 bit data) are
# mapped through a lookup table: no float copy of the image at all.
_LUT_MAX_SPAN = 1 << 16


def _rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the image's own value range linearly onto 0..255 (12-16 bit data, LUT output).

    Memory matters here (MAX_PIXELS allows 40 M pixels): integer data goes through a
    uint8 lookup table indexed by a uint16 offset array (2 bytes a pixel); other data is
    scaled in one float32 copy, in place (4 bytes a pixel). The result is
    rint((v - min) * 255 / (max - min)), as in float64, within one grey level.
    """
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    if values.dtype.kind in "iu":
        low, high = int(np.min(values)), int(np.max(values))
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        span = high - low
        if span < _LUT_MAX_SPAN:
            lut = np.rint(np.arange(span + 1, dtype=np.float64) * (255.0 / span))
            lut = lut.astype(np.uint8)
            offsets = np.empty(values.shape, dtype=np.uint16)
            # values - low lies in 0..span; a signed dtype may wrap while subtracting, but
            # the wrapped result cast to uint16 is still exact (arithmetic modulo 2**16).
            np.subtract(values, values.dtype.type(low), out=offsets, casting="unsafe")
            return lut[offsets]
    low, high = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CorruptImage("the image holds non-finite pixel values")
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # The one working copy. The subtraction runs in float64 a buffer at a time (values
    # far from zero keep their precision); only its result is stored as float32.
    scaled = np.empty(values.shape, dtype=np.float32)
    np.subtract(values, low, out=scaled, casting="unsafe")
    scaled *= np.float32(255.0 / (high - low))
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _short(exc: BaseException) -> str:
    # Decoder messages never contain pixel data, but keep them to one short line.
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
