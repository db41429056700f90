"""service.uploads: the multipart form read in memory, under its limits."""

from __future__ import annotations

import asyncio
import io
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from service.config import Settings
from service.main import create_app
from service.uploads import Upload, parse_form


def _big_png(side: int = 1400) -> bytes:
    """A noisy grey PNG of a few MB (noise does not compress)."""
    pixels = np.random.default_rng(3).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_uploads_over_a_megabyte_never_touch_the_disk(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette's form parser spools files over 1 MB to a temporary file: a patient's
    image on the server's disk. Ours keeps them in memory (bounded by MAX_FILE_BYTES)."""

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    monkeypatch.setattr("starlette.formparsers.SpooledTemporaryFile", no_disk)
    data = _big_png()
    assert len(data) > 1_900_000
    app = create_app(Settings(model_dir=tiny_bundle, max_batch_files=4))
    app.state.runner.load()

    async def run() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            single = await client.post("/predict", files={"file": ("big.png", data)})
            batch = await client.post(
                "/predict/batch", files=[("files", ("a.png", data)), ("files", ("b.png", data))]
            )
            return single, batch

    try:
        single, batch = asyncio.run(run())
    finally:
        app.state.runner.close()
    assert single.status_code == 200, single.text  # the tiny graph scores noise too
    assert batch.status_code == 200, batch.text
    assert [item["filename"] for item in batch.json()["results"]] == ["a.png", "b.png"]
    assert all("error" not in item for item in batch.json()["results"])


def test_a_file_over_the_limit_is_refused_without_keeping_it(tiny_bundle: Path) -> None:
    small = _big_png(200)
    app = create_app(Settings(model_dir=tiny_bundle, max_file_bytes=len(small) + 10))
    app.state.runner.load()

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/predict/batch",
                files=[("files", ("big.png", _big_png(400))), ("files", ("ok.png", small))],
            )

    try:
        response = asyncio.run(run())
    finally:
        app.state.runner.close()
    assert response.status_code == 200, response.text
    big, ok = response.json()["results"]
    assert big["error"]["code"] == "file_too_large" and big["filename"] == "big.png"
    assert "error" not in ok


def _form_in_chunks(body: bytes, content_type: str, chunk_sizes: list[int]) -> list[Upload]:
    """parse_form over a body that arrives in chunks of the given sizes (the rest last)."""
    chunks, offset = [], 0
    for size in chunk_sizes:
        chunks.append(body[offset : offset + size])
        offset += size
    chunks.append(body[offset:])
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages[-1]["more_body"] = False

    async def receive() -> dict:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-type", content_type.encode())],
    }
    form = asyncio.run(parse_form(Request(scope, receive), max_files=2, max_file_bytes=10**6))
    return form.uploads("file")


def test_a_file_split_anywhere_across_body_chunks_comes_back_byte_for_byte() -> None:
    """Parts are kept as views into the body's chunks and copied once at the end: every
    split, including one inside the closing boundary (python-multipart then hands back
    its own look-behind bytes), must give the exact bytes back, and two files their own."""
    first = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    second = b"\r\n" * 5 + bytes(reversed(range(256)))
    request = httpx.Request(
        "POST",
        "http://x/predict",
        files=[("file", ("a.png", first, "image/png")), ("file", ("b.png", second, "image/png"))],
    )
    body, content_type = request.read(), request.headers["content-type"]
    for split in range(1, len(body)):
        uploads = _form_in_chunks(body, content_type, [split])
        assert [u.data for u in uploads] == [first, second], split
    # Many small chunks too (a slow client).
    uploads = _form_in_chunks(body, content_type, [7] * (len(body) // 7))
    assert [u.data for u in uploads] == [first, second]
