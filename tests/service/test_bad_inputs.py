"""A corpus of bad uploads, end to end over real HTTP against one live server.

Every case must get a 4xx (never a 5xx) with the JSON error shape
{"error": {"code": ..., "message": ...}}, and the server must still be healthy after it.
The corpus is generated at run time from the committed X-ray fixtures; each case is its
own test id. The same bad files, together with one good X-ray, then go through
/predict/batch in one request.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import struct
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless

from tests.support.attack_images import black_png, png, twenty_byte_jpeg
from tests.support.damaged_images import damaged_exif_jpeg
from tests.support.dicom_factory import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    dicom_bytes,
    make_dataset,
    to_bytes,
)
from tests.support.leaks import leaks
from tests.support.live_server import LiveServer, live_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOOD_XRAY = FIXTURES / "fullres" / "NORMAL_IM-0206-0001.jpeg"  # 1040x747 grey JPEG
SMALL_XRAY = FIXTURES / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg"  # 224 px, 7 KB
DEFAULT_MAX_BATCH_FILES = 32
TIMEOUT = 60.0


# --- building the corpus --------------------------------------------------------------


@functools.cache
def good_jpeg() -> bytes:
    return GOOD_XRAY.read_bytes()


@functools.cache
def xray_grey() -> Image.Image:
    return Image.open(GOOD_XRAY).convert("L").resize((400, 288))


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bomb(side: int = 30000) -> bytes:
    """A valid side x side 8-bit grey PNG (900 MB of pixels at 30000) in under 1 MB."""
    return black_png(side, side, rows_per_block=1000)


def png_declares_20000() -> bytes:
    """A PNG header that declares 20000x20000 followed by a few bytes of image data."""
    return png(20000, 20000, zlib.compress(b"\x00" * 20001))


def png_1x1() -> bytes:
    return _save(Image.new("L", (1, 1), 128), "PNG")


def truncated_jpeg() -> bytes:
    data = good_jpeg()
    return data[: len(data) // 2]


def jpeg_header_only() -> bytes:
    """Every JPEG segment up to and including the start-of-scan header, no scan data."""
    data = good_jpeg()
    sos = data.index(b"\xff\xda")
    length = struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return data[: sos + 2 + length]


def cmyk_jpeg() -> bytes:
    return _save(xray_grey().convert("CMYK"), "JPEG")


def animated_gif() -> bytes:
    first = xray_grey()
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def zip_of_xray() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("chest.jpeg", good_jpeg())
    return buffer.getvalue()


def random_bytes() -> bytes:
    return np.random.default_rng(1234).bytes(50_000)


def jpeg_magic_then_garbage() -> bytes:
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(99).bytes(20_000)


def _dicom_pixels() -> np.ndarray:
    return np.asarray(xray_grey(), dtype=np.uint8)


def dicom_multiframe() -> bytes:
    pixels = _dicom_pixels()
    return dicom_bytes(np.stack([pixels, pixels, pixels]))


def dicom_no_pixels() -> bytes:
    return dicom_bytes(None, rows_columns=_dicom_pixels().shape)


def dicom_jpeg_ls_declared() -> bytes:
    return dicom_bytes(
        None,
        rows_columns=_dicom_pixels().shape,
        transfer_syntax=JPEGLSLossless,
        encapsulated_frames=[b"\x00" * 256],
    )


def dicom_path_as_photometric() -> bytes:
    """A value that looks like a path and an address where a code string belongs."""
    ds = make_dataset(_dicom_pixels())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: too long for a CS value
        ds.PhotometricInterpretation = "/etc/passwd 0x7fff"
        return to_bytes(ds)


def dicom_unknown_transfer_syntax() -> bytes:
    ds = make_dataset(_dicom_pixels())
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    return to_bytes(ds)


def dicom_garbage() -> bytes:
    return b"\x00" * 128 + b"DICM" + np.random.default_rng(5).bytes(4000)


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
    b'<rect width="512" height="512" fill="black"/><circle cx="256" cy="256" r="200" '
    b'fill="white"/></svg>'
)
HTML = b"<!doctype html><html><body><img src='chest.jpeg'><script>alert(1)</script></body></html>"


@dataclass(frozen=True)
class FileCase:
    """One bad file, uploaded in the right field: only its content is wrong."""

    id: str
    make: Callable[[], bytes]
    status: int
    code: str
    filename: str = "upload.bin"
    content_type: str = "application/octet-stream"


FILE_CASES: list[FileCase] = [
    FileCase("empty-file", lambda: b"", 400, "empty_file", "chest.jpeg", "image/jpeg"),
    FileCase("truncated-jpeg", truncated_jpeg, 400, "invalid_image", "chest.jpeg", "image/jpeg"),
    FileCase(
        "jpeg-header-only", jpeg_header_only, 400, "invalid_image", "chest.jpeg", "image/jpeg"
    ),
    FileCase(
        "jpeg-magic-then-garbage",
        jpeg_magic_then_garbage,
        400,
        "invalid_image",
        "chest.jpeg",
        "image/jpeg",
    ),
    FileCase(
        "text",
        lambda: b"this is a radiology report, not an image\n" * 20,
        415,
        "unsupported_media_type",
        "report.txt",
        "text/plain",
    ),
    FileCase(
        "text-named-jpeg",
        lambda: b"definitely not a JPEG\n" * 10,
        415,
        "unsupported_media_type",
        "chest.jpeg",
        "image/jpeg",
    ),
    FileCase("html", lambda: HTML, 415, "unsupported_media_type", "page.html", "text/html"),
    FileCase(
        "json",
        lambda: json.dumps({"image": "chest.jpeg", "pixels": [1, 2, 3]}).encode(),
        415,
        "unsupported_media_type",
        "data.json",
        "application/json",
    ),
    FileCase("svg", lambda: SVG, 415, "unsupported_media_type", "chest.svg", "image/svg+xml"),
    FileCase("zip", zip_of_xray, 415, "unsupported_media_type", "chest.zip", "application/zip"),
    FileCase(
        "gzip",
        lambda: gzip.compress(good_jpeg()),
        415,
        "unsupported_media_type",
        "chest.jpeg.gz",
        "application/gzip",
    ),
    FileCase(
        "pdf",
        lambda: _save(xray_grey(), "PDF"),
        415,
        "unsupported_media_type",
        "chest.pdf",
        "application/pdf",
    ),
    FileCase(
        "gif-static",
        lambda: _save(xray_grey(), "GIF"),
        415,
        "unsupported_media_type",
        "chest.gif",
        "image/gif",
    ),
    FileCase("gif-animated", animated_gif, 415, "unsupported_media_type", "chest.gif", "image/gif"),
    FileCase(
        "bmp",
        lambda: _save(xray_grey(), "BMP"),
        415,
        "unsupported_media_type",
        "chest.bmp",
        "image/bmp",
    ),
    FileCase(
        "tiff",
        lambda: _save(xray_grey(), "TIFF"),
        415,
        "unsupported_media_type",
        "chest.tiff",
        "image/tiff",
    ),
    FileCase(
        "webp",
        lambda: _save(xray_grey(), "WEBP"),
        415,
        "unsupported_media_type",
        "chest.webp",
        "image/webp",
    ),
    FileCase(
        "jpeg-damaged-exif", damaged_exif_jpeg, 400, "invalid_image", "chest.jpeg", "image/jpeg"
    ),
    FileCase("cmyk-jpeg", cmyk_jpeg, 415, "unsupported_media_type", "chest.jpeg", "image/jpeg"),
    FileCase(
        "png-decompression-bomb-30000px", png_bomb, 413, "image_too_large", "chest.png", "image/png"
    ),
    FileCase(
        "png-header-declares-20000px",
        png_declares_20000,
        413,
        "image_too_large",
        "chest.png",
        "image/png",
    ),
    FileCase("png-1x1", png_1x1, 422, "image_too_small", "chest.png", "image/png"),
    FileCase("random-bytes", random_bytes, 415, "unsupported_media_type"),
    FileCase(
        "dicom-multiframe",
        dicom_multiframe,
        415,
        "unsupported_media_type",
        "chest.dcm",
        "application/dicom",
    ),
    FileCase(
        "dicom-no-pixels",
        dicom_no_pixels,
        415,
        "unsupported_media_type",
        "chest.dcm",
        "application/dicom",
    ),
    FileCase(
        "dicom-jpeg-ls-no-decoder",
        dicom_jpeg_ls_declared,
        415,
        "unsupported_media_type",
        "chest.dcm",
        "application/dicom",
    ),
    FileCase(
        "dicom-garbage-after-preamble",
        dicom_garbage,
        400,
        "invalid_image",
        "chest.dcm",
        "application/dicom",
    ),
    FileCase(
        "long-filename-text",
        lambda: b"not an image",
        415,
        "unsupported_media_type",
        "x" * 2_000 + ".jpeg",
        "image/jpeg",
    ),
    # Pillow's message for it was "cannot identify image file <_io.BytesIO object at 0x...>".
    FileCase("jpeg-20-bytes", twenty_byte_jpeg, 400, "invalid_image", "chest.jpeg", "image/jpeg"),
    FileCase(
        "dicom-path-as-photometric",
        dicom_path_as_photometric,
        400,
        "invalid_image",
        "chest.dcm",
        "application/dicom",
    ),
    FileCase(
        "dicom-unknown-transfer-syntax",
        dicom_unknown_transfer_syntax,
        415,
        "unsupported_media_type",
        "chest.dcm",
        "application/dicom",
    ),
]


# --- multipart by hand: every byte of the request under the test's control -----------


def multipart(parts: list[tuple[str, str | None, str | None, bytes]]) -> tuple[dict, bytes]:
    """(headers, body) of a multipart/form-data request. Each part: (field name, filename
    or None for a plain text field, content type or None, content)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n"
        chunks.append(head.encode() + b"\r\n" + content + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def file_part(case: FileCase, field: str = "file") -> tuple[str, str, str, bytes]:
    return (field, case.filename, case.content_type, case.make())


@dataclass(frozen=True)
class RequestCase:
    """A request whose form (not file content) is wrong."""

    id: str
    path: str
    build: Callable[[], tuple[dict, bytes]]
    status: int
    code: str
    also: tuple[tuple[int, str], ...] = ()  # other acceptable (status, code) answers


def _good_part(field: str) -> tuple[str, str, str, bytes]:
    return (field, "chest.jpeg", "image/jpeg", SMALL_XRAY.read_bytes())


REQUEST_CASES: list[RequestCase] = [
    RequestCase(
        "wrong-field-name",
        "/predict",
        lambda: multipart([_good_part("image")]),
        422,
        "missing_file",
    ),
    RequestCase("no-file-at-all-empty-body", "/predict", lambda: ({}, b""), 422, "missing_file"),
    RequestCase("multipart-without-parts", "/predict", lambda: multipart([]), 422, "missing_file"),
    RequestCase(
        "file-field-as-text",
        "/predict",
        lambda: multipart([("file", None, None, b"chest.jpeg")]),
        422,
        "missing_file",
    ),
    RequestCase(
        "urlencoded-form",
        "/predict",
        lambda: ({"Content-Type": "application/x-www-form-urlencoded"}, b"file=chest.jpeg"),
        422,
        "missing_file",
    ),
    RequestCase(
        "json-body",
        "/predict",
        lambda: ({"Content-Type": "application/json"}, b'{"file": "chest.jpeg"}'),
        422,
        "missing_file",
    ),
    RequestCase(
        "raw-jpeg-body",
        "/predict",
        lambda: ({"Content-Type": "image/jpeg"}, SMALL_XRAY.read_bytes()),
        422,
        "missing_file",
    ),
    RequestCase(
        "multipart-part-without-disposition",
        "/predict",
        lambda: (
            {"Content-Type": "multipart/form-data; boundary=abc"},
            b"--abc\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\r\n--abc--\r\n",
        ),
        400,
        "invalid_multipart",
    ),
    RequestCase(
        "multipart-wrong-boundary",
        "/predict",
        lambda: (
            {"Content-Type": "multipart/form-data; boundary=abc"},
            (
                b'--xyz\r\nContent-Disposition: form-data; name="file"; '
                b'filename="a.jpeg"\r\n\r\n\xff\xd8\xff\r\n--xyz--\r\n'
            ),
        ),
        400,
        "invalid_multipart",
    ),
    RequestCase(
        "multipart-without-boundary-parameter",
        "/predict",
        lambda: ({"Content-Type": "multipart/form-data"}, SMALL_XRAY.read_bytes()),
        400,
        "invalid_multipart",
    ),
    # Cut off before the closing boundary: the unfinished part is dropped by the parser, so
    # the server sees no file (422 missing_file); 400 invalid_multipart would be as good.
    RequestCase(
        "multipart-truncated",
        "/predict",
        lambda: (
            {"Content-Type": "multipart/form-data; boundary=abc"},
            (
                b'--abc\r\nContent-Disposition: form-data; name="file"; '
                b'filename="a.jpeg"\r\n\r\n\xff\xd8\xff'
            ),
        ),
        422,
        "missing_file",
        also=((400, "invalid_multipart"),),
    ),
    RequestCase(
        "two-files-on-single-predict",
        "/predict",
        lambda: multipart([_good_part("file"), _good_part("file")]),
        413,
        "too_many_files",
    ),
    # A part header beyond the multipart parser's limit (python-multipart: 4 KiB a header
    # line) is a malformed body.
    RequestCase(
        "huge-filename",
        "/predict",
        lambda: multipart(
            [("file", "x" * 100_000 + ".jpeg", "image/jpeg", SMALL_XRAY.read_bytes())]
        ),
        400,
        "invalid_multipart",
    ),
    RequestCase(
        "batch-wrong-field-name",
        "/predict/batch",
        lambda: multipart([_good_part("file")]),
        422,
        "missing_file",
    ),
    RequestCase(
        "batch-too-many-files",
        "/predict/batch",
        lambda: multipart([_good_part("files")] * (DEFAULT_MAX_BATCH_FILES + 1)),
        413,
        "too_many_files",
    ),
]


# --- checks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as http:
        yield http


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert (response.status_code, error["code"]) == (status, code), body
    assert not leaks(error["message"]), error["message"]  # no repr, address, path, traceback
    return error


def assert_healthy(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", FILE_CASES, ids=[case.id for case in FILE_CASES])
def test_bad_file_is_rejected_cleanly(
    client: httpx.Client, server: LiveServer, case: FileCase
) -> None:
    headers, body = multipart([file_part(case)])
    response = client.post("/predict", content=body, headers=headers)
    error = assert_error(response, case.status, case.code)
    assert case.filename[:100] not in error["message"], "the filename is not echoed back"
    assert FAKE_PATIENT_NAME not in response.text and FAKE_PATIENT_ID not in response.text
    assert_healthy(client)


@pytest.mark.parametrize("case", REQUEST_CASES, ids=[case.id for case in REQUEST_CASES])
def test_bad_request_form_is_rejected_cleanly(client: httpx.Client, case: RequestCase) -> None:
    headers, body = case.build()
    response = client.post(case.path, content=body, headers=headers)
    status, code = case.status, case.code
    for other_status, other_code in case.also:
        if response.status_code == other_status:
            status, code = other_status, other_code
    assert_error(response, status, code)
    assert_healthy(client)


@pytest.mark.parametrize(
    ("filename", "content_type", "make"),
    [
        ("chest.png", "image/png", good_jpeg),  # a JPEG with a .png name: we sniff
        ("chest.dcm", "text/plain", good_jpeg),
        ("chest.jpeg", "image/jpeg", lambda: _save(xray_grey(), "PNG")),
        ("chest.jpeg", "application/octet-stream", lambda: dicom_bytes(_dicom_pixels())),
        ("x" * 1000 + ".jpeg", "image/jpeg", good_jpeg),  # a long filename is fine
    ],
    ids=[
        "jpeg-named-png",
        "jpeg-as-text-plain",
        "png-named-jpeg",
        "dicom-as-octet-stream",
        "long-filename-jpeg",
    ],
)
def test_misnamed_but_valid_images_are_accepted(
    client: httpx.Client, filename: str, content_type: str, make
) -> None:
    headers, body = multipart([("file", filename, content_type, make())])
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    assert result["label"] in {"NORMAL", "PNEUMONIA"}
    assert abs(sum(result["probabilities"].values()) - 1.0) < 1e-4


def test_batch_of_every_bad_file_plus_one_good_xray(
    client: httpx.Client, server: LiveServer
) -> None:
    cases = FILE_CASES
    assert len(cases) + 1 <= DEFAULT_MAX_BATCH_FILES
    good_index = len(cases) // 2
    parts = [file_part(case, "files") for case in cases]
    parts.insert(good_index, ("files", "good.jpeg", "image/jpeg", good_jpeg()))
    headers, body = multipart(parts)
    response = client.post("/predict/batch", content=body, headers=headers)
    assert response.status_code == 200, response.text[:1000]
    results = response.json()["results"]
    assert len(results) == len(cases) + 1
    good = results.pop(good_index)
    assert "error" not in good or good["error"] is None, good
    assert good["label"] in {"NORMAL", "PNEUMONIA"}
    assert abs(sum(good["probabilities"].values()) - 1.0) < 1e-4
    for case, result in zip(cases, results, strict=True):
        assert result.get("error"), (case.id, result)
        assert result.get("label") is None, (case.id, result)
        assert (result["error"]["code"], case.id) == (case.code, case.id), result
        assert result["error"]["message"] and not leaks(result["error"]["message"]), result
    assert FAKE_PATIENT_NAME not in response.text and FAKE_PATIENT_ID not in response.text
    assert_healthy(client)


def test_no_patient_identity_in_the_server_log(client: httpx.Client, server: LiveServer) -> None:
    """After the DICOM cases above (and once more here), the log never names the patient."""
    for case in FILE_CASES:
        if case.id.startswith("dicom"):
            headers, body = multipart([file_part(case)])
            client.post("/predict", content=body, headers=headers)
    log = server.log()
    assert log, "the server log is captured"
    assert FAKE_PATIENT_NAME not in log and "Fakeperson" not in log and FAKE_PATIENT_ID not in log


def test_wrong_method_and_unknown_route(client: httpx.Client) -> None:
    assert_error(client.get("/predict"), 405, "method_not_allowed")
    assert_error(client.post("/nope"), 404, "not_found")
    assert_healthy(client)


# --- a second server with small size limits -------------------------------------------

SMALL_FILE_LIMIT = 50_000
SMALL_REQUEST_LIMIT = 400_000


@pytest.fixture(scope="module")
def small_limits_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    env = {
        "MAX_FILE_BYTES": str(SMALL_FILE_LIMIT),
        "MAX_REQUEST_BYTES": str(SMALL_REQUEST_LIMIT),
        "MAX_BATCH_FILES": "4",
    }
    with live_server(tiny_bundle, env=env) as running:
        yield running


def test_file_over_max_file_bytes(small_limits_server: LiveServer) -> None:
    big = good_jpeg()
    assert SMALL_FILE_LIMIT < len(big) < SMALL_REQUEST_LIMIT
    with httpx.Client(base_url=small_limits_server.base_url, timeout=TIMEOUT) as http:
        headers, body = multipart([("file", "big.jpeg", "image/jpeg", big)])
        error = assert_error(
            http.post("/predict", content=body, headers=headers), 413, "file_too_large"
        )
        assert f"{SMALL_FILE_LIMIT:,}" in error["message"]
        assert_healthy(http)

        # In a batch only the big file fails; the small one is still predicted.
        headers, body = multipart([("files", "big.jpeg", "image/jpeg", big), _good_part("files")])
        response = http.post("/predict/batch", content=body, headers=headers)
        assert response.status_code == 200, response.text[:500]
        big_result, small_result = response.json()["results"]
        assert big_result["error"]["code"] == "file_too_large"
        assert small_result["label"] in {"NORMAL", "PNEUMONIA"}

        # MAX_BATCH_FILES from the environment.
        headers, body = multipart([_good_part("files")] * 5)
        assert_error(
            http.post("/predict/batch", content=body, headers=headers), 413, "too_many_files"
        )
        assert_healthy(http)


def test_request_over_max_request_bytes(small_limits_server: LiveServer) -> None:
    with httpx.Client(base_url=small_limits_server.base_url, timeout=TIMEOUT) as http:
        headers, body = multipart(
            [("files", "a.bin", "application/octet-stream", b"\x00" * (SMALL_REQUEST_LIMIT // 2))]
            * 3
        )
        assert len(body) > SMALL_REQUEST_LIMIT
        assert_error(
            http.post("/predict/batch", content=body, headers=headers), 413, "request_too_large"
        )

        # Streamed without Content-Length (chunked): still stopped at the limit.
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        response = http.post("/predict/batch", content=chunks(), headers=headers)
        assert_error(response, 413, "request_too_large")
        assert_healthy(http)
