"""The Open Inference Protocol v2 routes, driven by Triton's own client (tritonclient[http])
against the real app under uvicorn, and compared with /predict/batch."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.bundle import read_bundle
from tests.support.dicom_factory import dicom_bytes
from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import FULLRES, SMALL, png_bytes

MODEL = "tiny-test-model"
VERSION = "0.0.1"
OUTPUTS = ("probabilities", "label", "screen_positive")


def _files() -> list[tuple[str, bytes]]:
    grey = np.asarray(Image.open(FULLRES[0]).convert("L"))
    return [
        ("full.jpeg", FULLRES[1].read_bytes()),
        ("small.jpeg", SMALL[0].read_bytes()),
        ("grey.png", png_bytes(FULLRES[2])),
        ("chest.dcm", dicom_bytes(grey)),
    ]


def _client(server: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(
        url=server.base_url.removeprefix("http://"), network_timeout=60.0
    )


def _image_input(files: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)
    else:
        # JSON tensors carry each file in base64 (docs/integration.md).
        encoded = [base64.b64encode(data).decode() for data in files]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def _batch(server: LiveServer, files: list[tuple[str, bytes]]) -> list[dict]:
    response = httpx.post(
        server.url("/predict/batch"),
        timeout=60,
        files=[("files", (name, data)) for name, data in files],
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_predict_batch(server: LiveServer, tiny_bundle: Path, binary: bool) -> None:
    labels = read_bundle(tiny_bundle).labels
    files = _files()
    expected = _batch(server, files)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = _client(server).infer(
        MODEL, [_image_input([d for _, d in files], binary)], outputs=outputs, request_id="req-17"
    )
    response = result.get_response()
    assert response["id"] == "req-17"
    assert (response["model_name"], response["model_version"]) == (MODEL, VERSION)
    assert response["parameters"]["labels"] == ",".join(labels)
    for output in response["outputs"]:
        assert ("parameters" in output) is binary and ("data" in output) is not binary
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(files), 2)
    want = np.array([[item["probabilities"][name] for name in labels] for item in expected])
    # FP32 of the very values /predict/batch gives in float64: equal, not just close.
    np.testing.assert_array_equal(probabilities, want.astype(np.float32))
    got_labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert got_labels == [item["label"] for item in expected]
    assert result.as_numpy("screen_positive").tolist() == [
        item["screen_positive"] for item in expected
    ]


def test_infer_default_outputs_are_binary_and_versioned_route(server: LiveServer) -> None:
    files = [data for _, data in _files()[:2]]
    client = _client(server)
    # No outputs named: tritonclient asks for all of them in binary (binary_data_output).
    plain = client.infer(MODEL, [_image_input(files, True)])
    versioned = client.infer(MODEL, [_image_input(files, True)], model_version=VERSION)
    np.testing.assert_array_equal(
        plain.as_numpy("probabilities"), versioned.as_numpy("probabilities")
    )
    assert all("parameters" in o for o in plain.get_response()["outputs"])
    only = client.infer(
        MODEL,
        [_image_input(files, False)],
        outputs=[triton.InferRequestedOutput("screen_positive", False)],
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["screen_positive"]


def test_infer_compressed_request(server: LiveServer) -> None:
    files = [data for _, data in _files()[:2]]
    client = _client(server)
    plain = client.infer(MODEL, [_image_input(files, True)])
    for algorithm in ("gzip", "deflate"):
        packed = client.infer(
            MODEL, [_image_input(files, True)], request_compression_algorithm=algorithm
        )
        np.testing.assert_array_equal(
            plain.as_numpy("probabilities"), packed.as_numpy("probabilities")
        )


def test_health_and_metadata(server: LiveServer) -> None:
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, VERSION)
    assert not client.is_model_ready("other-model")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "pneumoscreen" and "binary_tensor_data" in metadata["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == [VERSION]
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 2]),
        "label": ("BYTES", [-1]),
        "screen_positive": ("BOOL", [-1]),
    }
    assert client.get_model_metadata(MODEL, VERSION) == model


def _triton_error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_errors_through_the_client(server: LiveServer) -> None:
    client = _client(server)
    files = [data for _, data in _files()[:1]]
    unknown = _triton_error(lambda: client.infer("other-model", [_image_input(files, True)]))
    assert unknown.status() == "404" and "other-model" in unknown.message()
    wrong_version = _triton_error(lambda: client.get_model_metadata(MODEL, model_version="9"))
    assert wrong_version.status() == "404"
    bad = [FULLRES[0].read_bytes(), b"GIF89a not an x-ray"]
    unsupported = _triton_error(lambda: client.infer(MODEL, [_image_input(bad, True)]))
    assert unsupported.status() == "415"
    assert "element 1: unsupported_media_type" in unsupported.message()
    tiny = _triton_error(lambda: client.infer(MODEL, [_image_input([png_tiny()], True)]))
    assert tiny.status() == "422" and "image_too_small" in tiny.message()


def png_tiny() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_infer(server: LiveServer, body: object, **headers: str) -> httpx.Response:
    return httpx.post(
        server.url(f"/v2/models/{MODEL}/infer"),
        timeout=30,
        content=json.dumps(body).encode(),
        headers=headers,
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": []}, 400, "exactly one input"),
        (
            {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]},
            400,
            "unknown input",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}]},
            400,
            "must be BYTES",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]},
            400,
            "shape [2] but 1 data",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            400,
            "not base64",
        ),
        (
            {
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [33], "data": ["AA=="] * 33}
                ]
            },
            413,
            "at most 32",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [""]}]},
            400,
            "empty_file",
        ),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                "outputs": [{"name": "logits"}],
            },
            400,
            "unknown output",
        ),
    ],
)
def test_protocol_errors_have_the_protocol_shape(
    server: LiveServer, body: object, status: int, fragment: str
) -> None:
    response = _json_infer(server, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error"} and isinstance(error["error"], str)
    assert fragment in error["error"]


def test_binary_framing_errors(server: LiveServer) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 10},
                }
            ]
        }
    ).encode()
    url = server.url(f"/v2/models/{MODEL}/infer")
    short = httpx.post(
        url,
        content=head + b"\x05\x00\x00\x00abc",
        timeout=30,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    no_header = httpx.post(url, content=head + b"\x06\x00\x00\x00abcdef", timeout=30)
    assert no_header.status_code == 400 and "not valid JSON" in no_header.json()["error"]


def test_unknown_routes_and_methods(server: LiveServer) -> None:
    assert httpx.get(server.url("/v2/repository/index"), timeout=30).json() == {
        "error": "no such route of the inference protocol"
    }
    wrong = httpx.delete(server.url(f"/v2/models/{MODEL}"), timeout=30)
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"}


def test_declared_body_over_the_limit_is_a_protocol_error(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, env={"MAX_REQUEST_BYTES": "1000"}) as server:
        response = httpx.post(
            server.url(f"/v2/models/{MODEL}/infer"), content=b"x" * 2000, timeout=30
        )
        assert response.status_code == 413
        assert "larger than the limit" in response.json()["error"]


@pytest.fixture(scope="module")
def keyed_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    with live_server(tiny_bundle, env={"API_KEY": "s3cret"}) as running:
        yield running


def test_infer_needs_the_api_key_when_set(keyed_server: LiveServer) -> None:
    client = _client(keyed_server)
    files = [data for _, data in _files()[:1]]
    assert client.is_server_ready()  # health and metadata stay open
    assert client.get_model_metadata(MODEL)["name"] == MODEL
    denied = _triton_error(lambda: client.infer(MODEL, [_image_input(files, True)]))
    assert denied.status() == "401"
    result = client.infer(MODEL, [_image_input(files, True)], headers={"X-API-Key": "s3cret"})
    assert result.as_numpy("probabilities").shape == (1, 2)


def test_v2_requests_are_counted_and_in_openapi(server: LiveServer) -> None:
    _client(server).infer(MODEL, [_image_input([FULLRES[0].read_bytes()], True)])
    metrics = httpx.get(server.url("/metrics"), timeout=30).text
    assert 'route="/v2/models/{name}/infer"' in metrics
    paths = httpx.get(server.url("/openapi.json"), timeout=30).json()["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert path in paths, path


def test_gzip_bomb_is_refused(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, env={"MAX_REQUEST_BYTES": "100000"}) as server:
        bomb = gzip.compress(b"\0" * 5_000_000)
        assert len(bomb) < 100_000
        response = httpx.post(
            server.url(f"/v2/models/{MODEL}/infer"),
            content=bomb,
            headers={"Content-Encoding": "gzip"},
            timeout=30,
        )
        assert response.status_code == 413
        assert "decompressed body" in response.json()["error"]


def test_infer_goes_through_admission(tiny_bundle: Path) -> None:
    """v2 infer is admitted like /predict: with MAX_QUEUE images in, 503 at once, in the
    protocol's error shape, with Retry-After; admitted again once they are out."""
    import asyncio

    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings(model_dir=tiny_bundle, providers="cpu", max_queue=2))
    runner = app.state.runner
    runner.load()
    name = runner.meta.name
    data = base64.b64encode(SMALL[0].read_bytes()).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]}

    async def run() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with runner.admission.enter() as ticket:
                ticket.grow(2)  # MAX_QUEUE images in
                busy = await client.post(f"/v2/models/{name}/infer", json=body)
            served = await client.post(f"/v2/models/{name}/infer", json=body)
            return busy, served

    try:
        busy, served = asyncio.run(run())
    finally:
        runner.close()
    assert busy.status_code == 503, busy.text
    assert "busy" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    assert served.status_code == 200, served.text
    assert runner.admission.in_flight == 0
