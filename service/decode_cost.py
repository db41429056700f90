"""What one decode will cost in memory, estimated from the header before decoding.

Two figures per image:

- `decoded_bytes`: the size of the decoded image, width x height x samples per pixel x
  bytes per sample (x frames for DICOM); for a JPEG the size it is decoded at (draft
  scale) plus, when it has several scans (progressive), the 2-byte DCT coefficient of
  every sample at full size, which libjpeg keeps for the whole image. This is what
  MAX_DECODED_BYTES limits.
- `working_bytes`: an upper bound on the memory the whole decode holds at its peak (the
  decoder's own image, the copies on the way to one uint8 grey array, fixed-size work
  buffers). This is what a decode reserves from DECODE_MEMORY_BUDGET_BYTES.
  tests/test_decode_memory.py checks it against tracemalloc's measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

# Bytes a pixel takes inside Pillow, by mode (Pillow stores 3- and 4-band images, and LA,
# in 4 bytes a pixel).
_PILLOW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
_PILLOW_WIDE = 4
# Rows of a DICOM image are windowed a strip of this many values at a time
# (service.preprocessing); each value needs ~40 bytes of float64 temporaries meanwhile.
DICOM_STRIP_VALUES = 256 * 1024
DICOM_STRIP_BYTES = 48 * DICOM_STRIP_VALUES
# PNG samples per pixel by colour type (PNG spec, 11.2.2 IHDR).
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@dataclass(frozen=True)
class DecodeCost:
    decoded_bytes: int
    working_bytes: int
    description: str  # e.g. "6320x6320 px x 4 samples x 2 bytes", for error messages


def _bytes_per_sample(bits: int) -> int:
    return max(1, (bits + 7) // 8)


def png_cost(width: int, height: int, bit_depth: int, colour_type: int, mode: str) -> DecodeCost:
    """A PNG decoded by Pillow into `mode`, then to uint8 grey."""
    samples = PNG_SAMPLES.get(colour_type, 4)
    per_sample = _bytes_per_sample(bit_depth)
    pixels = width * height
    decoded = pixels * samples * per_sample
    inside = _PILLOW_BYTES.get(mode, _PILLOW_WIDE)
    # Pillow's image and its EXIF-transposed copy, then at most two 2-byte arrays (16-bit
    # data: numpy copy and lookup offsets) or a grey copy and its array, and the result.
    working = pixels * (2 * inside + 5)
    return DecodeCost(
        decoded, working, f"{width}x{height} px x {samples} samples x {per_sample} bytes"
    )


def jpeg_cost(
    width: int,
    height: int,
    components: int,
    out_width: int,
    out_height: int,
    out_mode: str,
    multi_scan: bool,
) -> DecodeCost:
    """A JPEG of `width` x `height` decoded (draft scale) to `out_width` x `out_height`."""
    out_pixels = out_width * out_height
    bands = 1 if out_mode in ("L", "1") else 3
    coefficients = width * height * components * 2 if multi_scan else 0
    decoded = out_pixels * bands + coefficients
    inside = _PILLOW_BYTES.get(out_mode, _PILLOW_WIDE)
    working = coefficients + out_pixels * (2 * inside + 5)
    scans = ", progressive: 2-byte coefficients at full size" if multi_scan else ""
    return DecodeCost(decoded, working, f"{width}x{height} px x {components} components{scans}")


def dicom_cost(
    rows: int, columns: int, samples: int, bits_allocated: int, frames: int, encapsulated: bool
) -> DecodeCost:
    """A DICOM image: its PixelData as read, the decoded pixel array, the uint8 result."""
    per_sample = _bytes_per_sample(bits_allocated)
    values = rows * columns * samples * frames
    decoded = values * per_sample
    # The data set's copy of native PixelData, or for compressed data the decoder's own
    # image (up to 4 bytes a value); the pixel array; for colour data its 2-byte lookup
    # offsets, a 4-byte RGB image and its grey copy; the uint8 result. Windowing works in
    # strips of fixed size.
    source = values * 4 if encapsulated else decoded
    colour = values * 2 + rows * columns * frames * 5 if samples > 1 else 0
    working = source + decoded + colour + rows * columns * frames + DICOM_STRIP_BYTES
    frames_text = f" x {frames} frames" if frames > 1 else ""
    return DecodeCost(
        decoded,
        working,
        f"{columns}x{rows} px x {samples} samples x {per_sample} bytes{frames_text}",
    )
