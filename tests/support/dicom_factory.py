"""DICOM files for tests, written with pydicom from real X-ray pixels.

Everything here builds a *valid* Part 10 file (preamble, "DICM", file meta group) unless a
test asks for something broken on purpose. The patient identity is fake but recognisable,
so tests can assert that it never leaks into error messages or logs.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

FAKE_PATIENT_NAME = "Fakeperson^Testchild"
FAKE_PATIENT_ID = "FAKE-PID-7391"
FAKE_ACCESSION = "FAKEACC0042"

DX = DigitalXRayImageStorageForPresentation
CR = ComputedRadiographyImageStorage


def make_dataset(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    sop_class: UID = DX,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    encapsulated_frames: list[bytes] | None = None,
    rows_columns: tuple[int, int] | None = None,
) -> FileDataset:
    """A DICOM dataset holding `pixels` (uint8 or uint16; (rows, cols) or (frames, rows, cols)).

    - `bits_stored` defaults to 8 for uint8 and 12 for uint16 data.
    - `window` = (center, width) sets WindowCenter/WindowWidth.
    - `rescale` = (slope, intercept) sets RescaleSlope/RescaleIntercept.
    - `pixels=None` writes no PixelData at all (the image attributes are still present,
      from `rows_columns`).
    - `encapsulated_frames` writes those bytes as encapsulated (compressed) pixel data under
      `transfer_syntax` instead of native pixels: the data is just declared, not real.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = generate_uid()

    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX" if sop_class == DX else "CR"
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.AccessionNumber = FAKE_ACCESSION
    ds.PatientBirthDate = "20190101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if sop_class == DX:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelRepresentation = 0

    if pixels is not None:
        pixels = np.asarray(pixels)
        if pixels.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"pixels must be uint8 or uint16, got {pixels.dtype}")
        if pixels.ndim == 3:
            frames, rows, columns = pixels.shape
            ds.NumberOfFrames = frames
        elif pixels.ndim == 2:
            rows, columns = pixels.shape
        else:
            raise ValueError(f"pixels must be 2-D or 3-D, got shape {pixels.shape}")
        allocated = 8 if pixels.dtype == np.uint8 else 16
    elif rows_columns is not None:
        rows, columns = rows_columns
        allocated = 8 if bits_stored in (None, 8) else 16
    else:
        raise ValueError("give pixels or rows_columns")
    stored = bits_stored if bits_stored is not None else (8 if allocated == 8 else 12)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1

    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"

    if encapsulated_frames is not None:
        ds.PixelData = encapsulate(encapsulated_frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble + DICM + file meta)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray | None, **kwargs) -> bytes:
    """`make_dataset(pixels, **kwargs)` serialised to bytes."""
    return to_bytes(make_dataset(pixels, **kwargs))


def write_dicom(path: Path, pixels: np.ndarray | None, **kwargs) -> Path:
    """`make_dataset(pixels, **kwargs)` written to `path`."""
    path.write_bytes(dicom_bytes(pixels, **kwargs))
    return path


def to_12bit(grey: np.ndarray) -> np.ndarray:
    """8-bit grey pixels spread over 12 bits stored in uint16 (0..4095, 4095 == 255)."""
    return (grey.astype(np.uint32) * 4095 // 255).astype(np.uint16)


def deflated_dicom_bomb(
    pixel_bytes: int, rows_columns: tuple[int, int] | None = None, block: int = 1 << 20
) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM (1.2.840.10008.1.2.1.99) whose dataset
    inflates to about `pixel_bytes` of black 16-bit PixelData, in ~1 KB per MiB.

    `rows_columns` defaults to a square that holds exactly the pixel data, so the file is
    valid; give a small one to declare an image smaller than the data it carries. The
    zeros are deflated once per `block` with a full flush (no back references out of the
    block), and the compressed block is repeated: building a 512 MiB bomb takes
    milliseconds and never holds the inflated data in memory.
    """
    if rows_columns is None:
        side = int((pixel_bytes // 2) ** 0.5)
        rows_columns = (side, side)
        pixel_bytes = side * side * 2
    pixel_bytes -= pixel_bytes % block if pixel_bytes > block else 0
    ds = make_dataset(
        None,
        rows_columns=rows_columns,
        bits_stored=16,
        transfer_syntax=DeflatedExplicitVRLittleEndian,
    )
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    # (7FE0,0010) OW, reserved 2 bytes, 4-byte length: the PixelData element header.
    head.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflate.compress(head.getvalue()) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    whole, rest = divmod(pixel_bytes, block)
    piece = zeros.compress(b"\0" * block) + zeros.flush(zlib.Z_FULL_FLUSH)
    tail = zeros.compress(b"\0" * rest) + zeros.flush(zlib.Z_FINISH)

    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + start + piece * whole + tail


def deflated_dicom(pixels: np.ndarray, **kwargs) -> bytes:
    """A real (not malicious) deflated DICOM of `pixels`, written by pydicom itself."""
    ds = make_dataset(pixels, transfer_syntax=DeflatedExplicitVRLittleEndian, **kwargs)
    return to_bytes(ds)
