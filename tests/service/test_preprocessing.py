"""The shared image pipeline (service/preprocessing.py) on real radiographs.

Always runs on the committed fixtures; the tests marked `shared` also run on the 120
full-resolution JPEGs of ../shared/data and skip with a reason when it is absent.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from service.preprocessing import (
    DICOM,
    JPEG,
    PNG,
    CorruptImage,
    DecodeLimits,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    ImageTooSmall,
    UnsupportedImage,
    decode_grey,
    load_model_input,
    sniff_format,
    to_model_input,
)
from tests.support.damaged_images import TYPE_ERROR_EDITS, damaged_exif_jpeg
from tests.support.dicom_factory import (
    CR,
    DX,
    FAKE_ACCESSION,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    dicom_bytes,
    make_dataset,
    to_12bit,
    to_bytes,
)

TESTS_DIR = Path(__file__).resolve().parents[1]
FIXTURES = TESTS_DIR / "fixtures"
FIXTURE_FULLRES = sorted((FIXTURES / "fullres").glob("*.jpeg"))
FIXTURE_224 = sorted((FIXTURES / "chest_xray").glob("*/*/*.jpeg"))
SHARED = (TESTS_DIR.parent / ".." / "shared" / "data").resolve()
SHARED_FULLRES = sorted((SHARED / "chest_xray_fullres").glob("*/*.jpeg"))
SHARED_TRAIN = SHARED / "chest_xray" / "train"
NO_SHARED = f"needs the full-resolution X-rays in {SHARED / 'chest_xray_fullres'} (absent here)"

# One small and one mid-size real radiograph used by the format tests.
UPRIGHT_JPEG = FIXTURES / "fullres" / "NORMAL_IM-0206-0001.jpeg"  # 1040x747, grey, EXIF
RGB_JPEG = FIXTURES / "fullres" / "PNEUMONIA_person1159_virus_1946.jpeg"  # 620x359, RGB

SIZE = 224


def _shared_params() -> list:
    if not SHARED_FULLRES:
        return [pytest.param(None, id="shared-absent", marks=pytest.mark.skip(reason=NO_SHARED))]
    return [
        pytest.param(path, id=f"{path.parent.name}/{path.name}", marks=pytest.mark.shared)
        for path in SHARED_FULLRES
    ]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """A real radiograph as uint8 grey, downsized so the format tests stay fast."""
    image = Image.open(UPRIGHT_JPEG).convert("L").resize((520, 374), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


# --- real radiographs -----------------------------------------------------------------


def _check_real_xray(path: Path) -> None:
    data = path.read_bytes()
    assert sniff_format(data) == JPEG
    decoded = decode_grey(data)
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    with Image.open(path) as image:
        width, height = image.size
    assert decoded.shape == (height, width)
    assert decoded.std() > 10, "a radiograph has contrast"
    model_input = to_model_input(decoded, SIZE, SIZE)
    assert model_input.shape == (SIZE, SIZE, 3) and model_input.dtype == np.uint8
    assert np.array_equal(model_input[..., 0], model_input[..., 1])
    assert np.array_equal(model_input[..., 0], model_input[..., 2])
    # The one-call path used by training and serving agrees (draft decode: close, not equal).
    assert _mad(load_model_input(data, SIZE, SIZE), model_input) < 2.0


@pytest.mark.parametrize("path", FIXTURE_FULLRES + FIXTURE_224[:6], ids=lambda p: p.name)
def test_fixture_xrays_decode_to_grey_and_model_input(path: Path) -> None:
    _check_real_xray(path)


@pytest.mark.parametrize("path", _shared_params())
def test_shared_fullres_xrays_decode_to_grey_and_model_input(path: Path) -> None:
    _check_real_xray(path)


def test_to_model_input_non_square_and_rejects_bad_arrays(grey: np.ndarray) -> None:
    out = to_model_input(grey, 100, 150)
    assert out.shape == (100, 150, 3)
    same = to_model_input(grey, *grey.shape)
    assert np.array_equal(same[..., 0], grey)
    with pytest.raises(ValueError):
        to_model_input(grey.astype(np.float32), SIZE, SIZE)
    with pytest.raises(ValueError):
        to_model_input(np.stack([grey] * 3, axis=-1), SIZE, SIZE)


@pytest.mark.skipif(not SHARED_FULLRES, reason=NO_SHARED)
@pytest.mark.shared
def test_fullres_and_its_224px_training_copy_give_the_same_model_input() -> None:
    """Train/serve skew guard: the service sees a full-resolution upload; the model was
    trained on the 224 px copy of the same radiograph. Both must become nearly the same
    model input (the only differences: the JPEG re-encoding and resampling of the copy)."""
    per_image: dict[str, float] = {}
    for path in SHARED_FULLRES:
        copy = SHARED_TRAIN / path.parent.name / path.name
        assert copy.is_file(), f"{copy} (the 224 px copy named in the shared README) is missing"
        served = load_model_input(path.read_bytes(), SIZE, SIZE)
        trained = load_model_input(copy.read_bytes(), SIZE, SIZE)
        per_image[path.name] = _mad(served, trained)
    mean = float(np.mean(list(per_image.values())))
    worst = max(per_image, key=per_image.__getitem__)
    assert len(per_image) == len(SHARED_FULLRES)
    assert mean < 4.0, f"mean abs difference {mean:.2f} grey levels over {len(per_image)} pairs"
    assert per_image[worst] < 6.0, f"{worst}: {per_image[worst]:.2f} grey levels"


# --- JPEG: EXIF orientation, draft mode, colour modes ---------------------------------


def test_exif_orientation_6_is_honoured(grey: np.ndarray) -> None:
    upright = Image.fromarray(grey)
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to be shown,
    # so store the upright picture turned 90 degrees counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_bytes = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright_bytes = _encode(upright, "JPEG", quality=95)

    decoded = decode_grey(rotated_bytes)
    reference = decode_grey(upright_bytes)
    assert decoded.shape == grey.shape == reference.shape
    assert _mad(decoded, reference) < 1.5, "EXIF-rotated JPEG differs from the upright one"
    assert stored.size == (grey.shape[0], grey.shape[1]), "stored pixels are transposed"
    # Turning the wrong way would be far off (so the comparison above can fail).
    assert _mad(decoded, np.rot90(reference, 2)) > 10

    # With draft decoding (target size hint) and a non-square model input.
    for height, width in ((SIZE, SIZE), (128, 256)):
        a = load_model_input(rotated_bytes, height, width)
        b = load_model_input(upright_bytes, height, width)
        assert a.shape == (height, width, 3)
        assert _mad(a, b) < 1.5


@pytest.mark.parametrize(
    "edits",
    [
        TYPE_ERROR_EDITS,  # Make becomes tag 0x013F: TypeError on re-encoding
        ((41, 28),),
    ],  # Make becomes PlanarConfiguration, a SHORT holding text: struct.error
    ids=["exif-typeerror", "exif-struct-error"],
)
def test_damaged_exif_is_a_corrupt_image_not_a_crash(edits: tuple[tuple[int, int], ...]) -> None:
    data = damaged_exif_jpeg(edits)
    with pytest.raises(CorruptImage) as raised:
        decode_grey(data)
    assert raised.value.code == "invalid_image"
    with pytest.raises(CorruptImage):
        load_model_input(data, SIZE, SIZE)


def test_draft_mode_decodes_smaller_but_gives_the_same_model_input() -> None:
    data = (FIXTURES / "fullres" / "NORMAL_NORMAL2-IM-0967-0001.jpeg").read_bytes()  # 1844x1256
    full = decode_grey(data)
    drafted = decode_grey(data, target_size=(SIZE, SIZE))
    assert full.shape == (1256, 1844)
    assert drafted.shape[0] < full.shape[0] and drafted.shape[1] < full.shape[1]
    assert min(drafted.shape) >= SIZE, "draft never goes below the requested size"
    assert _mad(to_model_input(drafted, SIZE, SIZE), to_model_input(full, SIZE, SIZE)) < 2.0


def test_rgb_jpeg_radiograph_becomes_grey() -> None:
    data = RGB_JPEG.read_bytes()
    with Image.open(RGB_JPEG) as image:
        assert image.mode == "RGB"
        expected = np.asarray(image.convert("L"))
    assert np.array_equal(decode_grey(data), expected)


def test_cmyk_jpeg_is_unsupported(grey: np.ndarray) -> None:
    data = _encode(Image.fromarray(grey).convert("CMYK"), "JPEG")
    with pytest.raises(UnsupportedImage) as info:
        decode_grey(data)
    assert info.value.code == "unsupported_media_type"
    assert "CMYK" in info.value.message


# --- PNG modes ------------------------------------------------------------------------


def test_png_8bit_grey_is_lossless(grey: np.ndarray) -> None:
    data = _encode(Image.fromarray(grey), "PNG")
    assert sniff_format(data) == PNG
    assert np.array_equal(decode_grey(data), grey)


def test_png_16bit_grey_is_rescaled_to_full_range(grey: np.ndarray) -> None:
    # Full 16-bit range: the same picture as the 8-bit source.
    full = Image.fromarray(grey.astype(np.uint16) * 257)
    assert full.mode == "I;16"
    data = _encode(full, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I;16"), check.mode
    decoded = decode_grey(data)
    assert decoded.dtype == np.uint8
    stretched = (grey.astype(np.float64) - grey.min()) * 255.0 / (grey.max() - grey.min())
    assert np.abs(decoded.astype(np.float64) - stretched).max() <= 1.0

    # A 12-bit detector's values in a 16-bit PNG (1000..5095): stretched to 0..255.
    narrow = (grey.astype(np.uint16) * 16 + 1000).astype(np.uint16)
    decoded_narrow = decode_grey(_encode(Image.fromarray(narrow), "PNG"))
    assert decoded_narrow.min() == 0 and decoded_narrow.max() == 255
    assert np.abs(decoded_narrow.astype(np.float64) - stretched).max() <= 1.0


def test_png_16bit_4_megapixels_decodes_without_float64_copies() -> None:
    """A 34 KB 16-bit PNG of 2000x2000 px once peaked at ~128 MB of numpy arrays (float64
    temporaries); at MAX_PIXELS=40M that is ~1.3 GB per upload."""
    import tracemalloc

    ramp = np.add.outer(np.arange(2000), np.arange(2000)).astype(np.uint16) * 16
    data = _encode(Image.fromarray(ramp), "PNG")
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        decoded = decode_grey(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.shape == (2000, 2000) and decoded.dtype == np.uint8
    assert decoded.min() == 0 and decoded.max() == 255
    # uint16 pixels (8 MB), a uint16 offset array (8 MB) and the uint8 result (4 MB).
    assert peak < 24 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize(
    "values",
    [
        np.arange(3, 250, dtype=np.uint8).reshape(13, 19),
        np.arange(0, 65536, 7, dtype=np.uint16).reshape(-1, 1),
        (np.arange(6000).reshape(60, 100) + 100).astype(">u2"),  # big-endian 16-bit PNG rows
        np.arange(-32768, 32768, 3, dtype=np.int16).reshape(-1, 1),  # wraps while subtracting
        (np.arange(4096).reshape(64, 64) + 10**9).astype(np.int32),
        np.linspace(-(2**31), 2**31 - 1, 5000).astype(np.int64).astype(np.int32).reshape(50, 100),
        np.linspace(-1000.5, 3000.25, 5000).reshape(50, 100),  # float64 (DICOM LUT output)
        np.linspace(0, 50, 5000).reshape(50, 100) + 1e9,  # far from zero: no float32 loss
        np.linspace(-1, 1, 5000, dtype=np.float32).reshape(50, 100),
        np.arange(3 * 20 * 30, dtype=np.uint16).reshape(20, 30, 3),  # RGB DICOM samples
    ],
    ids=[
        "uint8",
        "uint16-full",
        "uint16-big-endian",
        "int16-full",
        "int32-narrow",
        "int32-wide",
        "float64",
        "float64-offset",
        "float32",
        "rgb",
    ],
)
def test_rescale_matches_float64_within_one_grey_level(values: np.ndarray) -> None:
    from service.preprocessing import _rescale_to_uint8

    reference = values.astype(np.float64)
    low, high = reference.min(), reference.max()
    expected = np.clip(np.rint((reference - low) * (255.0 / (high - low))), 0, 255)
    result = _rescale_to_uint8(values)
    assert result.dtype == np.uint8 and result.shape == values.shape
    assert result.min() == 0 and result.max() == 255
    assert np.abs(result.astype(np.float64) - expected).max() <= 1.0
    assert np.array_equal(_rescale_to_uint8(np.full((4, 4), 7, np.uint16)), np.zeros((4, 4)))
    with pytest.raises(CorruptImage):
        _rescale_to_uint8(np.array([[0.0, np.nan]]))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_png_colour_modes_give_the_grey_source(grey: np.ndarray, mode: str) -> None:
    source = Image.fromarray(grey)
    if mode == "RGBA":
        converted = source.convert("RGBA")
        converted.putalpha(
            Image.fromarray((np.arange(grey.size) % 256).astype(np.uint8).reshape(grey.shape))
        )  # alpha must be ignored
    else:
        converted = source.convert(mode)
    data = _encode(converted, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    decoded = decode_grey(data)
    assert decoded.shape == grey.shape
    assert np.abs(decoded.astype(np.int16) - grey.astype(np.int16)).max() <= 1


# --- errors common to all formats -----------------------------------------------------


def test_empty_unknown_and_disallowed_inputs(grey: np.ndarray) -> None:
    with pytest.raises(EmptyImage):
        decode_grey(b"")
    with pytest.raises(UnsupportedImage, match="not a JPEG, PNG or DICOM"):
        decode_grey(b"hello, I am not an image")
    with pytest.raises(UnsupportedImage, match="GIF"):
        decode_grey(_encode(Image.fromarray(grey), "GIF"))
    png_only = DecodeLimits(allowed_formats=frozenset({PNG}))
    with pytest.raises(UnsupportedImage, match="not accepted by this server"):
        decode_grey(UPRIGHT_JPEG.read_bytes(), limits=png_only)


def test_pixel_limits(grey: np.ndarray) -> None:
    data = _encode(Image.fromarray(grey), "PNG")
    with pytest.raises(ImageTooLarge):
        decode_grey(data, limits=DecodeLimits(max_pixels=grey.size - 1))
    with pytest.raises(ImageTooSmall):
        decode_grey(_encode(Image.fromarray(grey[:20, :20]), "PNG"))
    with pytest.raises(CorruptImage):
        decode_grey(UPRIGHT_JPEG.read_bytes()[:2000])


# --- DICOM ----------------------------------------------------------------------------


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI, output 0..1."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("sop_class", [DX, CR], ids=["DX", "CR"])
def test_dicom_monochrome2_8bit(grey: np.ndarray, sop_class) -> None:
    data = dicom_bytes(grey, sop_class=sop_class)
    assert sniff_format(data) == DICOM
    assert np.array_equal(decode_grey(data), grey)


def test_dicom_monochrome2_16bit_12_stored(grey: np.ndarray) -> None:
    ds = make_dataset(to_12bit(grey))
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert np.array_equal(decode_grey(to_bytes(ds)), grey)


def test_dicom_monochrome1_is_inverted_like_monochrome2(grey: np.ndarray) -> None:
    m2 = decode_grey(dicom_bytes(to_12bit(grey)))
    m1 = decode_grey(dicom_bytes(4095 - to_12bit(grey), photometric="MONOCHROME1"))
    assert np.array_equal(m1, m2)
    m1_8 = decode_grey(dicom_bytes(255 - grey, photometric="MONOCHROME1"))
    assert np.array_equal(m1_8, grey)


def test_dicom_window_is_applied(grey: np.ndarray) -> None:
    stored = to_12bit(grey)
    # A window covering the whole 12-bit range changes nothing (within rounding).
    full = decode_grey(dicom_bytes(stored, window=(2048, 4096)))
    assert np.abs(full.astype(np.int16) - grey.astype(np.int16)).max() <= 1

    # A window over the middle half saturates both ends: the expected clipped result.
    center, width = 2048.0, 2048.0
    windowed = decode_grey(dicom_bytes(stored, window=(center, width)))
    expected = np.rint(_window(stored.astype(np.float64), center, width) * 255.0)
    assert np.abs(windowed.astype(np.float64) - expected).max() <= 1.0
    assert (windowed == 0).mean() > 0.01 and (windowed == 255).mean() > 0.01
    assert _mad(windowed, grey) > 10, "the window really changed the picture"

    # MONOCHROME1 with the same window (on the inverted stored values) gives the same.
    windowed_m1 = decode_grey(
        dicom_bytes(4095 - stored, photometric="MONOCHROME1", window=(4095 - center, width))
    )
    assert np.abs(windowed_m1.astype(np.int16) - windowed.astype(np.int16)).max() <= 1


def test_dicom_rescale_slope_intercept_comes_before_the_window(grey: np.ndarray) -> None:
    stored = to_12bit(grey)
    slope, intercept = 2.0, -1000.0
    plain = decode_grey(dicom_bytes(stored, rescale=(slope, intercept)))
    assert np.abs(plain.astype(np.int16) - grey.astype(np.int16)).max() <= 1
    # The window is in output (modality) units: the same window as above, rescaled.
    windowed = decode_grey(
        dicom_bytes(stored, rescale=(slope, intercept), window=(2048 * slope + intercept, 4096))
    )
    expected = decode_grey(dicom_bytes(stored, window=(2048, 2048)))
    assert np.abs(windowed.astype(np.int16) - expected.astype(np.int16)).max() <= 1


def _rgb_dicom(rgb: np.ndarray) -> bytes:
    ds = make_dataset(None, rows_columns=rgb.shape[:2])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def test_dicom_rgb_becomes_grey_and_counts_three_samples_per_pixel(grey: np.ndarray) -> None:
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    data = _rgb_dicom(rgb)
    decoded = decode_grey(data)
    assert decoded.shape == grey.shape
    assert np.abs(decoded.astype(np.int16) - grey.astype(np.int16)).max() <= 1
    # Three values a pixel: an RGB image of N pixels needs a limit of 3 N, not N.
    with pytest.raises(ImageTooLarge, match="3 samples"):
        decode_grey(data, limits=DecodeLimits(max_pixels=grey.size * 3 - 1))
    assert decode_grey(data, limits=DecodeLimits(max_pixels=grey.size * 3)).shape == grey.shape


def test_dicom_real_xray_becomes_the_same_model_input_as_its_jpeg() -> None:
    data = UPRIGHT_JPEG.read_bytes()
    jpeg_grey = decode_grey(data)
    from_dicom = load_model_input(dicom_bytes(to_12bit(jpeg_grey)), SIZE, SIZE)
    from_jpeg = to_model_input(jpeg_grey, SIZE, SIZE)
    assert _mad(from_dicom, from_jpeg) < 0.5


def _dicom_error(data: bytes) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_grey(data)
    message = info.value.message
    for secret in (FAKE_PATIENT_NAME, FAKE_PATIENT_ID, FAKE_ACCESSION, "Fakeperson", "Testchild"):
        assert secret not in message and secret not in str(info.value)
    return info.value


def test_dicom_multi_frame_is_unsupported(grey: np.ndarray) -> None:
    error = _dicom_error(dicom_bytes(np.stack([grey, grey])))
    assert isinstance(error, UnsupportedImage) and "multi-frame" in error.message


def test_dicom_without_pixel_data_is_unsupported(grey: np.ndarray) -> None:
    error = _dicom_error(dicom_bytes(None, rows_columns=grey.shape))
    assert isinstance(error, UnsupportedImage) and "PixelData" in error.message


def test_dicom_compressed_syntax_without_a_handler_is_unsupported(grey: np.ndarray) -> None:
    # JPEG-LS needs pyjpegls/GDCM, which the service does not install.
    data = dicom_bytes(
        None,
        rows_columns=grey.shape,
        transfer_syntax=JPEGLSLossless,
        encapsulated_frames=[b"\x00" * 64],
    )
    error = _dicom_error(data)
    assert isinstance(error, UnsupportedImage)
    assert error.code == "unsupported_media_type"
    assert "JPEG-LS" in error.message and "cannot be decoded" in error.message


def test_dicom_jpeg2000_with_declared_but_bogus_data_is_a_clean_error(grey: np.ndarray) -> None:
    # Pillow can decode JPEG 2000, so the handler exists; the "pixel data" is 64 zero bytes.
    data = dicom_bytes(
        None,
        rows_columns=grey.shape,
        transfer_syntax=JPEG2000Lossless,
        encapsulated_frames=[b"\x00" * 64],
    )
    error = _dicom_error(data)
    assert isinstance(error, UnsupportedImage | CorruptImage)
    assert "JPEG 2000" in error.message


def test_dicom_garbage_after_preamble_is_corrupt() -> None:
    rng = np.random.default_rng(7)
    for tail in (b"", b"not dicom at all " * 20, rng.bytes(3000)):
        error = _dicom_error(b"\x00" * 128 + b"DICM" + tail)
        assert isinstance(error, CorruptImage), (tail[:20], error)
        assert error.code == "invalid_image"


def test_damaged_dicom_never_crashes_or_leaks_the_patient(
    grey: np.ndarray, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    """Truncated files and flipped header bytes: an ImageError (or a decoded image), never
    another exception, and no message, warning or log line that quotes the patient."""
    good = dicom_bytes(grey[:128, :128])
    rng = np.random.default_rng(1)
    caplog.set_level(logging.DEBUG)
    outcomes = set()
    for i in range(120):
        if i % 2:
            damaged = good[: int(rng.integers(132, len(good)))]
        else:
            buffer = bytearray(good)
            for _ in range(5):
                buffer[int(rng.integers(132, 700))] = int(rng.integers(0, 256))
            damaged = bytes(buffer)
        try:
            decode_grey(damaged)
            outcomes.add("decoded")
        except ImageError as error:
            outcomes.add(type(error).__name__)
            assert FAKE_PATIENT_ID not in error.message and "Fakeperson" not in error.message
    assert "CorruptImage" in outcomes
    logged = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "Fakeperson" not in logged and FAKE_PATIENT_ID not in logged
