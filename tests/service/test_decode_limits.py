"""Decode budgets in service.preprocessing: each cost is known from the header and
refused before decoding; a process-wide memory budget bounds what decodes hold together.

The heavy inputs (issue 8) are generated here, in milliseconds (tests/support/attack_images.py,
tests/support/dicom_factory.py). "Before decoding" is checked by making the decoder itself fail
the test if it is reached, not by timing.
"""

from __future__ import annotations

import io
import threading
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from service.decode_budget import DecodeMemoryBudget
from service.dicom_inflate import DEFLATED, inflate_dicom, transfer_syntax
from service.jpeg_markers import count_jpeg_scans
from service.preprocessing import (
    DEFAULT_LIMITS,
    CorruptImage,
    DecodeLimits,
    DecoderBusy,
    ImageError,
    ImageTooComplex,
    ImageTooLarge,
    decode_grey,
    load_model_input,
)
from tests.support.attack_images import black_png, png_rgba16, progressive_jpeg, twenty_byte_jpeg
from tests.support.dicom_factory import (
    deflated_dicom,
    deflated_dicom_bomb,
    dicom_bytes,
    make_dataset,
    to_12bit,
    to_bytes,
)
from tests.support.leaks import leaks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FULLRES = sorted((FIXTURES / "fullres").glob("*.jpeg"))
MiB = 1024 * 1024


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    image = Image.open(FULLRES[0]).convert("L").resize((520, 374))
    return np.asarray(image, dtype=np.uint8)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Pillow or pydicom start decoding pixels."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the decoder was reached")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))


# --- JPEG scans -----------------------------------------------------------------------


def test_scan_count_of_real_and_encoder_written_jpegs(grey: np.ndarray) -> None:
    for path in FULLRES:
        assert count_jpeg_scans(path.read_bytes()) == 1, path.name  # baseline
    image = Image.fromarray(grey)
    # libjpeg's standard progression: 6 scans for grey, 10 for colour.
    assert count_jpeg_scans(_encode(image, "JPEG", progressive=True)) == 6
    assert count_jpeg_scans(_encode(image.convert("RGB"), "JPEG", progressive=True)) == 10
    assert count_jpeg_scans(progressive_jpeg(256, 40)) == 40
    assert count_jpeg_scans(progressive_jpeg(256, 40), stop_above=7) == 8
    assert count_jpeg_scans(b"not a jpeg") == 0


def test_scan_markers_inside_other_segments_are_not_counted(grey: np.ndarray) -> None:
    """An APP segment (EXIF thumbnails are whole JPEGs) may hold SOS bytes: skipped by
    its length, as the decoder does."""
    data = _encode(Image.fromarray(grey), "JPEG")
    payload = b"thumb" + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 50
    app2 = b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload
    assert count_jpeg_scans(data[:2] + app2 + data[2:]) == 1
    assert decode_grey(data[:2] + app2 + data[2:]).shape == grey.shape


def test_progressive_jpeg_with_500_scans_is_refused_before_decoding(
    no_pixel_decoding: None,
) -> None:
    data = progressive_jpeg(4096, 500)
    assert len(data) < 110_000
    with pytest.raises(ImageTooComplex) as raised:
        decode_grey(data, target_size=(224, 224))
    assert raised.value.code == "image_too_complex"
    assert "32 scans" in raised.value.message


def test_scan_limit_is_a_setting_and_real_progressive_jpegs_pass(grey: np.ndarray) -> None:
    data = _encode(Image.fromarray(grey), "JPEG", progressive=True)  # 6 scans
    assert decode_grey(data).shape == grey.shape
    with pytest.raises(ImageTooComplex):
        decode_grey(data, limits=DecodeLimits(max_jpeg_scans=5))
    assert decode_grey(progressive_jpeg(512, 32), (224, 224)).shape == (256, 256)


def test_a_progressive_jpeg_inside_a_dicom_is_counted_too(no_pixel_decoding: None) -> None:
    frame = progressive_jpeg(512, 200)
    data = dicom_bytes(
        None, rows_columns=(512, 512), transfer_syntax=JPEGBaseline8Bit, encapsulated_frames=[frame]
    )
    with pytest.raises(ImageTooComplex, match="in the DICOM file"):
        decode_grey(data)


# --- decoded bytes --------------------------------------------------------------------


def test_png_rgba16_6320_is_refused_by_decoded_bytes_not_pixels(no_pixel_decoding: None) -> None:
    data = png_rgba16()
    assert 6320 * 6320 <= DEFAULT_LIMITS.max_pixels  # MAX_PIXELS alone would let it in
    with pytest.raises(ImageTooLarge) as raised:
        decode_grey(data)
    message = raised.value.message
    assert "319,539,200 bytes" in message and "4 samples x 2 bytes" in message


def test_a_16bit_4k_png_passes_the_default_budget() -> None:
    decoded = decode_grey(black_png(4096, 4096, 16))  # 32 MiB decoded
    assert decoded.shape == (4096, 4096)
    with pytest.raises(ImageTooLarge):
        decode_grey(black_png(4096, 4096, 16), limits=DecodeLimits(max_decoded_bytes=32 * MiB - 1))


def test_dicom_decoded_bytes_count_bits_allocated(grey: np.ndarray) -> None:
    data = dicom_bytes(to_12bit(grey))  # 16 bits allocated: 2 bytes a pixel
    with pytest.raises(ImageTooLarge, match="2 bytes"):
        decode_grey(data, limits=DecodeLimits(max_decoded_bytes=grey.size * 2 - 1))
    assert decode_grey(data, limits=DecodeLimits(max_decoded_bytes=grey.size * 2)).shape == (
        grey.shape
    )


def test_jpeg_cost_is_its_draft_size(grey: np.ndarray) -> None:
    """A large baseline JPEG decoded at 1/8 scale costs its drafted size, not its full one."""
    big = Image.fromarray(grey).resize((4000, 3000))
    data = _encode(big, "JPEG")
    limits = DecodeLimits(max_decoded_bytes=2 * MiB)  # full size would be 12 MB
    assert load_model_input(data, 224, 224, limits).shape == (224, 224, 3)
    with pytest.raises(ImageTooLarge):
        decode_grey(data, limits=limits)  # no target size: decoded at full size


# --- Deflated DICOM -------------------------------------------------------------------


def test_deflated_dicom_decodes_like_its_uncompressed_copy(grey: np.ndarray) -> None:
    pixels = to_12bit(grey)
    deflated = deflated_dicom(pixels, window=(1800, 2500))
    assert transfer_syntax(deflated) == DEFLATED
    assert np.array_equal(
        decode_grey(deflated), decode_grey(dicom_bytes(pixels, window=(1800, 2500)))
    )
    # What we hand pydicom is a valid Explicit VR Little Endian file with the same data.
    inflated = pydicom.dcmread(io.BytesIO(inflate_dicom(deflated, 64 * MiB)))
    original = pydicom.dcmread(io.BytesIO(deflated))
    assert inflated.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert inflated.PixelData == original.PixelData
    assert inflated.PatientID == original.PatientID
    # A file that is not deflated is returned as it is, not copied.
    plain = dicom_bytes(grey)
    assert inflate_dicom(plain, 1) is plain


@pytest.mark.parametrize(
    ("rows_columns", "refused_by"),
    [
        (None, "16384x16384 px"),  # declares its size: over MAX_PIXELS, on its header
        ((6000, 6000), "would decode to 72,000,000 bytes"),  # under MAX_PIXELS, 16-bit
        ((512, 512), "inflates to more than"),
    ],  # declares 512x512 but carries 512 MiB
    ids=["declares-16384px", "declares-6000px-16bit", "lies-about-its-size"],
)
def test_deflated_dicom_bomb_is_refused_with_bounded_memory(
    rows_columns: tuple[int, int] | None, refused_by: str
) -> None:
    data = deflated_dicom_bomb(512 * MiB, rows_columns)
    assert len(data) < 600_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as raised:
            decode_grey(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused_by in raised.value.message
    # The first 64 KiB inflated to read the header, or the declared 0.5 MiB image plus
    # 1 MiB for other elements: pydicom alone inflated all 512 MiB and peaked at ~1.1 GB.
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_deflated_dicom_without_readable_attributes_is_capped_by_the_limit() -> None:
    """When the image attributes are not in the first 64 KiB (a large element before
    them), the cap is MAX_DECODED_BYTES plus 1 MiB."""
    ds = make_dataset(None, rows_columns=(512, 512), bits_stored=16, transfer_syntax=DEFLATED)
    ds.add_new((0x0011, 0x0010), "LO", "ACME")  # a private block before group 0028
    ds.add_new((0x0011, 0x1001), "OB", b"\0" * (128 * 1024))
    ds.PixelData = b"\0" * (3 * MiB)
    ds["PixelData"].VR = "OW"
    data = to_bytes(ds)
    limits = DecodeLimits(max_decoded_bytes=1 * MiB)
    with pytest.raises(ImageTooLarge, match="inflates to more than 2,097,152 bytes"):
        decode_grey(data, limits=limits)


def test_damaged_deflate_streams_are_corrupt_images(grey: np.ndarray) -> None:
    deflated = deflated_dicom(grey)
    start = deflated.index(b"DICM") + 4
    meta_end = len(deflated) - len(zlib.compress(b""))  # somewhere in the stream
    for damaged in (
        deflated[: (start + len(deflated)) // 2],  # cut short
        deflated[: meta_end // 2] + b"\xff" * 64,
    ):  # garbage stream
        with pytest.raises(ImageError) as raised:
            decode_grey(damaged)
        assert isinstance(raised.value, CorruptImage | ImageTooLarge), raised.value
        assert not leaks(raised.value.message), raised.value.message


# --- the process-wide budget ----------------------------------------------------------


class RecordingBudget(DecodeMemoryBudget):
    def __init__(self, capacity: int, wait_s: float = 0.0) -> None:
        super().__init__(capacity, wait_s)
        self.reserved: list[int] = []

    def acquire(self, nbytes: int, wait_s: float | None = None) -> int:
        amount = super().acquire(nbytes, wait_s)
        self.reserved.append(amount)
        return amount


def _dicom_cases(grey: np.ndarray) -> dict[str, bytes]:
    big = np.asarray(Image.fromarray(grey).resize((2000, 1500)))
    pixels = to_12bit(big)
    rgb = make_dataset(None, rows_columns=big.shape)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = np.repeat(big[:, :, None], 3, axis=2).tobytes()
    rgb["PixelData"].VR = "OB"
    return {
        "dicom-8bit": dicom_bytes(big),
        "dicom-16bit": dicom_bytes(pixels),
        "dicom-16bit-rescale-window": dicom_bytes(
            pixels, window=(900, 1500), rescale=(0.5, -100.0)
        ),
        "dicom-monochrome1": dicom_bytes(pixels, photometric="MONOCHROME1"),
        "dicom-rgb": to_bytes(rgb),
        "dicom-deflated-16bit": deflated_dicom(pixels, window=(1800, 2500)),
    }


def test_reservations_bound_the_measured_peak_of_each_dicom_decode(grey: np.ndarray) -> None:
    """What a DICOM decode reserves (service.decode_cost) is at least what it allocates
    (tracemalloc sees numpy's and pydicom's memory; Pillow's own is not traced)."""
    for name, data in _dicom_cases(grey).items():
        budget = RecordingBudget(1024 * MiB)
        tracemalloc.start()
        try:
            decode_grey(data, limits=DecodeLimits(memory=budget))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert budget.reserved and budget.in_use == 0, name
        assert peak <= max(budget.reserved), (name, peak, budget.reserved)
        # And not wildly more than needed: within 4x of the measured peak.
        assert max(budget.reserved) < 4 * peak + 16 * MiB, (name, peak, budget.reserved)


def test_windowing_in_strips_keeps_dicom_memory_low(grey: np.ndarray) -> None:
    """pydicom's LUTs in float64 over the whole image peaked at 30 bytes a pixel for a
    16-bit image with rescale and window; strips keep it near the arrays themselves."""
    data = _dicom_cases(grey)["dicom-16bit-rescale-window"]
    tracemalloc.start()
    try:
        decode_grey(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2000 * 1500 * 10, f"{peak / (2000 * 1500):.1f} bytes a pixel"


def test_a_taken_budget_answers_busy_then_frees(grey: np.ndarray) -> None:
    budget = DecodeMemoryBudget(8 * MiB, wait_s=0.05)
    limits = DecodeLimits(memory=budget)
    data = _encode(Image.fromarray(grey), "PNG")
    held = budget.acquire(8 * MiB)
    with pytest.raises(DecoderBusy) as raised:
        decode_grey(data, limits=limits)
    assert raised.value.code == "server_busy"
    assert budget.in_use == held
    budget.release(held)
    assert np.array_equal(decode_grey(data, limits=limits), grey)
    assert budget.in_use == 0


def test_the_budget_is_given_back_when_a_decode_fails(grey: np.ndarray) -> None:
    budget = DecodeMemoryBudget(64 * MiB, wait_s=0)
    limits = DecodeLimits(memory=budget)
    png = _encode(Image.fromarray(grey), "PNG")
    broken = png[: len(png) // 2]  # header fine, data truncated: fails while reserved
    with pytest.raises(CorruptImage):
        decode_grey(broken, limits=limits)
    bad_pixels = dicom_bytes(grey)[:-1000]
    with pytest.raises(ImageError):
        decode_grey(bad_pixels, limits=limits)
    assert budget.in_use == 0


def test_concurrent_decodes_share_the_budget(grey: np.ndarray) -> None:
    """Eight threads decoding 16-bit images: each waits for its share, none fails, and the
    budget is never overdrawn."""
    data = dicom_bytes(to_12bit(np.asarray(Image.fromarray(grey).resize((1500, 1200)))))
    budget = RecordingBudget(48 * MiB, wait_s=60)
    limits = DecodeLimits(memory=budget)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                decode_grey(data, limits=limits)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(budget.reserved) == 24 and budget.in_use == 0
    assert 2 * max(budget.reserved) > 48 * MiB // 2, "each decode takes a real share"


def test_training_decodes_without_a_process_budget() -> None:
    assert DEFAULT_LIMITS.memory is None


# --- error messages -------------------------------------------------------------------


def _bad_inputs(grey: np.ndarray) -> dict[str, bytes]:
    png = _encode(Image.fromarray(grey), "PNG")
    jpeg = FULLRES[0].read_bytes()
    photometric = make_dataset(grey)
    photometric.PhotometricInterpretation = "/etc/passwd 0x7fff"
    unknown_syntax = make_dataset(grey)
    unknown_syntax.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    return {
        "jpeg-20-bytes": twenty_byte_jpeg(),
        "jpeg-truncated": jpeg[: len(jpeg) // 3],
        "jpeg-sos-without-data": jpeg[: jpeg.index(b"\xff\xda") + 14],
        "jpeg-random-after-magic": b"\xff\xd8\xff\xe0" + np.random.default_rng(3).bytes(5000),
        "png-truncated": png[: len(png) // 2],
        "png-header-only": png[:33],
        "png-garbage-idat": png[:41] + np.random.default_rng(4).bytes(2000),
        "dicom-truncated": dicom_bytes(grey)[:700],
        "dicom-garbage": b"\x00" * 128 + b"DICM" + np.random.default_rng(5).bytes(3000),
        "dicom-path-as-photometric": to_bytes(photometric),
        "dicom-unknown-transfer-syntax": to_bytes(unknown_syntax),
    }


def test_error_messages_hold_no_reprs_addresses_or_paths(grey: np.ndarray) -> None:
    """Pillow's own message for a 20-byte JPEG was `cannot identify image file
    <_io.BytesIO object at 0x7fa8...>`; no decoder text reaches a message now."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the 18-character CS value
        cases = _bad_inputs(grey)
    for name, data in cases.items():
        with pytest.raises(ImageError) as raised:
            decode_grey(data)
        message = raised.value.message
        assert message and not leaks(message), (name, message)
        assert "/etc/passwd" not in message and "BytesIO" not in message, (name, message)
