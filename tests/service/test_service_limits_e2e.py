"""Limits over HTTP, on one server with small limits: file, request, batch, pixels, types."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.dicom_factory import dicom_bytes
from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import FULLRES, SMALL, tiny_png

MAX_FILE = 300_000
MAX_REQUEST = 1_500_000
MAX_FILES = 3
MAX_PIXELS = 2_000_000
MIN_SIDE = 100


@pytest.fixture(scope="module")
def limited(tiny_bundle: Path) -> Iterator[LiveServer]:
    env = {
        "MAX_FILE_BYTES": str(MAX_FILE),
        "MAX_REQUEST_BYTES": str(MAX_REQUEST),
        "MAX_BATCH_FILES": str(MAX_FILES),
        "MAX_PIXELS": str(MAX_PIXELS),
        "MIN_IMAGE_SIDE": str(MIN_SIDE),
        "ALLOWED_TYPES": "jpeg,png",
    }
    with live_server(tiny_bundle, env=env) as running:
        yield running


def _big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 100).save(buffer, format="PNG")
    return buffer.getvalue()


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_file_too_large(limited: LiveServer) -> None:
    big = next(p for p in FULLRES if p.stat().st_size > MAX_FILE).read_bytes()
    response = httpx.post(f"{limited.base_url}/predict", files={"file": ("a.jpeg", big)})
    assert _error(response) == (413, "file_too_large")
    # In a batch it is one item's error; the others are still predicted.
    batch = httpx.post(
        f"{limited.base_url}/predict/batch",
        files=[("files", ("big.jpeg", big)), ("files", ("ok.jpeg", SMALL[0].read_bytes()))],
    )
    assert batch.status_code == 200
    first, second = batch.json()["results"]
    assert first["error"]["code"] == "file_too_large"
    assert "probabilities" in second


def test_too_many_files(limited: LiveServer) -> None:
    data = SMALL[0].read_bytes()
    files = [("files", (f"{i}.jpeg", data)) for i in range(MAX_FILES + 1)]
    response = httpx.post(f"{limited.base_url}/predict/batch", files=files)
    assert _error(response) == (413, "too_many_files")
    ok = httpx.post(f"{limited.base_url}/predict/batch", files=files[:MAX_FILES])
    assert ok.status_code == 200 and len(ok.json()["results"]) == MAX_FILES


def test_max_pixels_and_min_side(limited: LiveServer) -> None:
    huge = _big_png(2000, 1500)  # 3 Mpx, but a small file
    assert len(huge) < MAX_FILE
    response = httpx.post(f"{limited.base_url}/predict", files={"file": ("huge.png", huge)})
    assert _error(response) == (413, "image_too_large")
    small = httpx.post(f"{limited.base_url}/predict", files={"file": ("s.png", tiny_png(64))})
    assert _error(small) == (422, "image_too_small")


def test_disallowed_type(limited: LiveServer) -> None:
    grey = np.asarray(Image.open(SMALL[0]).convert("L"))
    response = httpx.post(
        f"{limited.base_url}/predict", files={"file": ("x.dcm", dicom_bytes(grey))}
    )
    assert _error(response) == (415, "unsupported_media_type")


def _multipart(data: bytes, field: str = "file") -> tuple[bytes, str]:
    boundary = "pneumoscreen-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="a.jpeg"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def test_request_too_large_on_content_length(limited: LiveServer) -> None:
    body, boundary = _multipart(b"\xff\xd8\xff" + b"\0" * (MAX_REQUEST + 10))
    response = httpx.post(
        f"{limited.base_url}/predict",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert _error(response) == (413, "request_too_large")


def test_request_too_large_while_streaming(limited: LiveServer) -> None:
    """Chunked upload (no Content-Length): the limit applies as the bytes arrive."""
    body, boundary = _multipart(b"\xff\xd8\xff" + b"\0" * (MAX_REQUEST + 10))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = httpx.post(
        f"{limited.base_url}/predict/batch",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert _error(response) == (413, "request_too_large")


def test_raw_chunked_upload_is_cut_off(limited: LiveServer) -> None:
    """A hand-written chunked request on a raw socket: answered 413 mid-stream."""
    body, boundary = _multipart(b"\xff\xd8\xff" + b"\0" * (MAX_REQUEST + 10), field="files")
    host, port = "127.0.0.1", limited.port
    with socket.create_connection((host, port), timeout=30) as sock:
        head = (
            f"POST /predict/batch HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        sock.sendall(head)
        try:
            for start in range(0, len(body), 64 * 1024):
                chunk = body[start : start + 64 * 1024]
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close as soon as it has answered
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer


def test_server_still_healthy_after_limits(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.base_url) as client:
        assert client.get("/health").status_code == 200
        ok = client.post("/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())})
        assert ok.status_code == 200
        metrics = client.get("/metrics").text
    for code in ("file_too_large", "image_too_large", "image_too_small"):
        assert f'pneumoscreen_image_errors_total{{code="{code}"}}' in metrics
    assert 'route="/predict",status="413"' in metrics
