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
import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.decode_budget import BudgetUnavailable, DecodeMemoryBudget
from service.decode_cost import (
    DICOM_STRIP_VALUES,
    DecodeCost,
    dicom_cost,
    jpeg_cost,
    png_cost,
)
from service.dicom_inflate import (
    DEFLATED,
    MAX_DEFLATE_RATIO,
    BadFileMeta,
    InflateLimitExceeded,
    image_attributes,
    inflate_dicom,
    inflated_head,
    transfer_syntax,
)
from service.jpeg_markers import count_jpeg_scans

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


class ImageTooComplex(ImageError):
    """Small, but too costly to decode in time (a progressive JPEG with too many scans)."""

    code = "image_too_complex"


class DecoderBusy(ImageError):
    """Not the image's fault: the process-wide decode memory budget stayed in use."""

    code = "server_busy"


MiB = 1024 * 1024
# A deflated DICOM may inflate to its image plus this much of other elements.
DICOM_HEADER_ALLOWANCE = 1 * MiB
# How much of a deflated data set is inflated first, to read its image attributes.
DICOM_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class DecodeLimits:
    """Guards against decompression bombs and inputs that are not radiographs.

    `max_decoded_bytes` bounds one decode (service.decode_cost: width x height x samples
    x bytes per sample, known from the header before decoding); `memory`, when set, is the
    budget all decodes of the process share (training decodes without one).
    """

    max_pixels: int = 40_000_000
    min_side: int = 32
    allowed_formats: frozenset[str] = field(default=SUPPORTED_FORMATS)
    # A 16-bit 4096x4096 image is 32 MiB, an 8-bit RGB one 48 MiB.
    max_decoded_bytes: int = 64 * MiB
    # Encoders write 1 (baseline) to ~10 scans (libjpeg's progression: 6 grey, 10 colour).
    max_jpeg_scans: int = 32
    memory: DecodeMemoryBudget | None = field(default=None, compare=False, repr=False)


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
        grey = _decode_pillow(data, kind, target_size, limits)
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
    data: bytes, kind: str, target_size: tuple[int, int] | None, limits: DecodeLimits
) -> np.ndarray:
    scans = count_jpeg_scans(data, stop_above=limits.max_jpeg_scans) if kind == JPEG else 0
    if scans > limits.max_jpeg_scans:
        raise ImageTooComplex(
            f"the JPEG has more than {limits.max_jpeg_scans} scans; progressive JPEGs "
            "from real encoders have about 10"
        )
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
            full_size = image.size
            if image.format == "JPEG" and target_size is not None:
                # Only for JPEG: its EXIF is in the header, whereas Pillow decodes a whole
                # PNG to look for an eXIf chunk after the image data.
                orientation = image.getexif().get(0x0112, 1)
                height, width = target_size
                if orientation in _TRANSPOSED_ORIENTATIONS:
                    height, width = width, height
                image.draft("L", (width, height))
            cost = _pillow_cost(image, data, full_size, scans)
            _check_decoded_bytes(cost, limits)
            with _reserved(limits, cost.working_bytes):
                try:
                    return _loaded_grey(image)
                finally:
                    image.close()  # frees Pillow's image while the reservation is held
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge("the image has too many pixels to decode") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Our own words only: Pillow's messages can hold an object repr with a memory
        # address ("cannot identify image file <_io.BytesIO object at 0x...>").
        raise CorruptImage(_pillow_failure(exc, kind)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes
        # e.g. a damaged EXIF block makes ImageOps.exif_transpose raise TypeError or
        # struct.error: still a bad upload (4xx), never a server error.
        # Only the exception type: the message could quote an EXIF value (e.g. Artist).
        raise CorruptImage(f"the image could not be decoded ({type(exc).__name__})") from None


def _pillow_cost(
    image: Image.Image, data: bytes, full_size: tuple[int, int], scans: int
) -> DecodeCost:
    width, height = full_size
    if image.format == "PNG":
        # IHDR is the first chunk (PNG spec 5.6): bit depth at 24, colour type at 25.
        return png_cost(width, height, data[24], data[25], image.mode)
    components = int(getattr(image, "layers", len(image.getbands())) or 1)
    return jpeg_cost(
        width, height, components, image.size[0], image.size[1], image.mode, multi_scan=scans > 1
    )


def _pillow_failure(exc: BaseException, kind: str) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"the file starts like a {kind.upper()} but its header cannot be read"
    if "truncated" in str(exc).lower():
        return "the image could not be decoded: the file is truncated"
    return "the image could not be decoded: its data is damaged"


def _loaded_grey(image: Image.Image) -> np.ndarray:
    image.load()
    return _pillow_to_grey(ImageOps.exif_transpose(image))


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
            if transfer_syntax(data) == DEFLATED:
                return _decode_deflated_dicom(data, limits)
            return _decode_dicom_dataset(data, limits)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes
            # Only the exception type: a parser message could quote a (patient) value.
            raise CorruptImage(f"the DICOM file could not be read ({type(exc).__name__})") from None


def _decode_deflated_dicom(data: bytes, limits: DecodeLimits) -> tuple[np.ndarray, Dataset]:
    """Inflate under a cap (service.dicom_inflate), holding memory for the inflated data
    set and the copy pydicom makes of it; then decode as any other DICOM.

    The image attributes normally sit in the first kilobytes: when they can be read from
    there, a too large image is refused before anything else is inflated, and the cap and
    the reservation are that image's own size instead of the limit."""
    cap = limits.max_decoded_bytes + DICOM_HEADER_ALLOWANCE
    attributes = image_attributes(inflated_head(data, DICOM_HEAD_BYTES))
    if attributes is not None:
        rows, columns = attributes["rows"], attributes["columns"]
        _check_pixels(columns, rows, limits, max(1, attributes["samples"]))
        cost = dicom_cost(
            rows,
            columns,
            max(1, attributes["samples"]),
            attributes["bits_allocated"] or 16,
            max(1, attributes["frames"]),
            encapsulated=False,
        )
        _check_decoded_bytes(cost, limits)
        cap = min(cap, cost.decoded_bytes + DICOM_HEADER_ALLOWANCE)
    bound = min(cap, MAX_DEFLATE_RATIO * len(data))
    with _reserved(limits, 2 * bound):
        try:
            inflated = inflate_dicom(data, cap)
        except InflateLimitExceeded:
            raise ImageTooLarge(
                f"the deflated DICOM data set inflates to more than {cap:,} bytes: more "
                f"than its image (at most {limits.max_decoded_bytes:,} bytes) plus "
                f"{DICOM_HEADER_ALLOWANCE:,} of other elements"
            ) from None
        except (zlib.error, BadFileMeta):
            raise CorruptImage("the deflated DICOM data set is damaged") from None
        dataset = _read_dicom(inflated)
        del inflated
    # The data set is held outside any reservation until the decode reserves its own
    # cost (which counts the data set's pixel data): two reservations in turn, never
    # nested, so two decodes can never wait on each other.
    return _decode_dicom_dataset(dataset, limits)


def _read_dicom(data: bytes) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise CorruptImage(
            "the DICOM file could not be read: its file meta information is missing or invalid"
        ) from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise CorruptImage(
            f"the DICOM file could not be read: its data set is damaged ({type(exc).__name__})"
        ) from None
    # pydicom keeps the stream it read (for deferred reads, which are not used): let an
    # inflated copy go as soon as the caller drops it.
    if hasattr(dataset, "buffer"):
        dataset.buffer = None
    return dataset


def _decode_dicom_dataset(
    source: bytes | Dataset, limits: DecodeLimits
) -> tuple[np.ndarray, Dataset]:
    """`source`: the file's bytes or a data set pydicom has read already. Returns the image
    and the data set without its pixel data (the header the reports copy)."""
    dataset = _read_dicom(source) if isinstance(source, bytes) else source
    if "TransferSyntaxUID" not in dataset.file_meta:
        # "DICM" followed by bytes pydicom parsed leniently into nothing meaningful.
        raise CorruptImage("the DICOM file could not be read: no valid file meta information")
    if "PixelData" not in dataset:
        raise UnsupportedImage("the DICOM file holds no image (no PixelData)")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    # An RGB DICOM holds (and decodes to) three values per pixel: count them all.
    samples = max(1, int(dataset.get("SamplesPerPixel", 1) or 1))
    _check_pixels(columns, rows, limits, samples)
    frames = max(1, int(dataset.get("NumberOfFrames", 1) or 1))
    syntax = dataset.file_meta.TransferSyntaxUID
    cost = dicom_cost(
        rows,
        columns,
        samples,
        int(dataset.get("BitsAllocated", 16) or 16),
        frames,
        encapsulated=_is_encapsulated(syntax),
    )
    _check_decoded_bytes(cost, limits)
    if frames > 1:
        raise UnsupportedImage("multi-frame DICOM is not supported; send one frame")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if _is_jpeg_process(syntax):
        _check_dicom_jpeg_scans(dataset, limits)
    with _reserved(limits, cost.working_bytes):
        try:
            return _dicom_pixels_to_grey(dataset, photometric, syntax), dataset
        finally:
            _drop_pixels(dataset)


def _drop_pixels(dataset: Dataset) -> None:
    """Free the pixel data and pydicom's cached pixel array now, while the reservation is
    still held (the caller may keep the data set a little longer)."""
    with suppress(KeyError):
        del dataset["PixelData"]
    if hasattr(dataset, "_pixel_array"):
        dataset._pixel_array = None


def _dicom_pixels_to_grey(dataset: Dataset, photometric: str, syntax: object) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError):
        raise UnsupportedImage(
            f"DICOM transfer syntax {_syntax_name(syntax)} cannot be decoded by this server"
        ) from None
    except (ValueError, AttributeError, KeyError, TypeError, OSError):
        raise CorruptImage(
            f"the DICOM pixel data ({_syntax_name(syntax)}) could not be decoded: it is "
            "damaged or does not match the image attributes"
        ) from None

    if photometric.startswith("MONOCHROME"):
        if pixels.ndim != 2:
            raise UnsupportedImage(f"unexpected DICOM pixel array shape {pixels.shape}")
        grey = _windowed_to_uint8(pixels, dataset)
        # MONOCHROME1 means the lowest value is white: invert so bone is bright as in training.
        return 255 - grey if photometric == "MONOCHROME1" else grey
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels.processing import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = Image.fromarray(_rescale_to_uint8(np.asarray(pixels)), "RGB")
        return np.asarray(rgb.convert("L"), dtype=np.uint8)
    shown = photometric if _CODE_STRING.fullmatch(photometric) else "(not a valid value)"
    raise UnsupportedImage(f"DICOM photometric interpretation {shown} is not supported")


def _windowed_to_uint8(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Modality LUT, then VOI LUT (both pointwise), then the image's own range onto
    0..255, a strip of rows at a time: pydicom works in float64, which for the whole image
    at once is 8 bytes a value per step (a 16-bit 4k x 4k image peaked at ~1 GB). The
    result is the same, bit for bit, as applying each step to the whole image."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    rows_per_strip = max(1, DICOM_STRIP_VALUES // max(1, pixels.shape[1]))

    def strips() -> Iterator[tuple[slice, np.ndarray]]:
        for start in range(0, pixels.shape[0], rows_per_strip):
            rows = slice(start, start + rows_per_strip)
            yield (
                rows,
                np.asarray(apply_voi_lut(apply_modality_lut(pixels[rows], dataset), dataset)),
            )

    low = high = None
    kind = "i"
    for _, values in strips():
        if values.size == 0:
            continue
        kind = "iu" if values.dtype.kind in "iu" else "f"
        strip_low, strip_high = np.min(values), np.max(values)
        # np.minimum, not min(): a NaN must carry through to the non-finite check.
        low = strip_low if low is None else np.minimum(low, strip_low)
        high = strip_high if high is None else np.maximum(high, strip_high)
    grey = np.zeros(pixels.shape, dtype=np.uint8)
    if low is None:
        return grey
    mapping = _UInt8Map.of(low, high, integer=kind == "iu")
    if mapping is None:
        return grey
    for rows, values in strips():
        grey[rows] = mapping.apply(values)
    return grey


def _check_dicom_jpeg_scans(dataset: Dataset, limits: DecodeLimits) -> None:
    """A JPEG inside a DICOM costs what a JPEG upload costs: count its scans too."""
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1), b"")
    except Exception:  # noqa: BLE001 - broken encapsulation: pixel_array reports it
        return
    if count_jpeg_scans(frame, stop_above=limits.max_jpeg_scans) > limits.max_jpeg_scans:
        raise ImageTooComplex(
            f"the JPEG in the DICOM file has more than {limits.max_jpeg_scans} scans"
        )


# JPEG processes 1, 2+4 and 14 (lossless) in DICOM: 1.2.840.10008.1.2.4.50 .. .70.
_JPEG_PROCESS_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70))
# DICOM CS values: upper case letters, digits, space and underscore, at most 16.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def _is_jpeg_process(syntax: object) -> bool:
    return str(syntax) in _JPEG_PROCESS_SYNTAXES


def _is_encapsulated(syntax: object) -> bool:
    return bool(getattr(syntax, "is_encapsulated", False)) if _is_registered(syntax) else False


def _is_registered(syntax: object) -> bool:
    # pydicom.uid imports the registry from its private _uid_dict and does not re-export it.
    from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

    return str(syntax) in UID_dictionary


def _syntax_name(syntax: object) -> str:
    """The registered name of a transfer syntax; never the file's own text otherwise."""
    if _is_registered(syntax):
        return str(getattr(syntax, "name", syntax))
    return "(not a registered transfer syntax)"


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


def _check_decoded_bytes(cost: DecodeCost, limits: DecodeLimits) -> None:
    if cost.decoded_bytes > limits.max_decoded_bytes:
        raise ImageTooLarge(
            f"the image would decode to {cost.decoded_bytes:,} bytes ({cost.description}); "
            f"the limit is {limits.max_decoded_bytes:,} bytes"
        )


@contextmanager
def _reserved(limits: DecodeLimits, nbytes: int) -> Iterator[None]:
    """Hold `nbytes` of the process-wide decode budget, when there is one."""
    if limits.memory is None:
        yield
        return
    try:
        amount = limits.memory.acquire(nbytes)
    except BudgetUnavailable as exc:
        raise DecoderBusy(
            f"the server is busy decoding other large images (no decode memory free "
            f"within {exc.wait_s:g} s); try again shortly"
        ) from None
    try:
        yield
    finally:
        limits.memory.release(amount)


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
    integer = values.dtype.kind in "iu"
    mapping = _UInt8Map.of(np.min(values), np.max(values), integer)
    if mapping is None:
        return np.zeros(values.shape, dtype=np.uint8)
    return mapping.apply(values)


@dataclass(frozen=True)
class _UInt8Map:
    """The linear map of [low, high] onto 0..255; None (from `of`) for a flat image."""

    low: int | float
    high: int | float
    lut: np.ndarray | None  # integer data spanning < 2**16 levels

    @classmethod
    def of(cls, low: object, high: object, integer: bool) -> _UInt8Map | None:
        if integer:
            low_int, high_int = int(low), int(high)  # type: ignore[call-overload]
            if high_int <= low_int:
                return None
            span = high_int - low_int
            if span < _LUT_MAX_SPAN:
                lut = np.rint(np.arange(span + 1, dtype=np.float64) * (255.0 / span))
                return cls(low_int, high_int, lut.astype(np.uint8))
        low_float, high_float = float(low), float(high)  # type: ignore[arg-type]
        if not (np.isfinite(low_float) and np.isfinite(high_float)):
            raise CorruptImage("the image holds non-finite pixel values")
        if high_float <= low_float:
            return None
        return cls(low_float, high_float, None)

    def apply(self, values: np.ndarray) -> np.ndarray:
        if self.lut is not None:
            offsets = np.empty(values.shape, dtype=np.uint16)
            # values - low lies in 0..span; a signed dtype may wrap while subtracting, but
            # the wrapped result cast to uint16 is still exact (arithmetic modulo 2**16).
            np.subtract(values, values.dtype.type(self.low), out=offsets, casting="unsafe")
            return self.lut[offsets]
        # The one working copy. The subtraction runs in float64 a buffer at a time (values
        # far from zero keep their precision); only its result is stored as float32.
        scaled = np.empty(values.shape, dtype=np.float32)
        np.subtract(values, self.low, out=scaled, casting="unsafe")
        scaled *= np.float32(255.0 / (self.high - self.low))
        np.rint(scaled, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        return scaled.astype(np.uint8)
