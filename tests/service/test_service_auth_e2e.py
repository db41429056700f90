"""API key over HTTP: predict routes need X-API-Key when API_KEY is set; others stay open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import SMALL

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def keyed_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    with live_server(tiny_bundle, env={"API_KEY": KEY}) as running:
        yield running


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"X-API-Key": KEY + "x"},
        {"Authorization": KEY},
    ],
)
def test_predict_routes_refuse_without_the_right_key(
    keyed_server: LiveServer, headers: dict[str, str]
) -> None:
    data = SMALL[0].read_bytes()
    with httpx.Client(base_url=keyed_server.base_url, timeout=30) as client:
        single = client.post("/predict", files={"file": ("a.jpeg", data)}, headers=headers)
        batch = client.post("/predict/batch", files={"files": ("a.jpeg", data)}, headers=headers)
        # Auth is checked before the body: even a request without a file is 401.
        empty = client.post("/predict", headers=headers)
    for response in (single, batch, empty):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert KEY not in response.text


def test_predict_routes_accept_the_key(keyed_server: LiveServer) -> None:
    data = SMALL[0].read_bytes()
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=keyed_server.base_url, timeout=30, headers=headers) as client:
        assert client.post("/predict", files={"file": ("a.jpeg", data)}).status_code == 200
        batch = client.post("/predict/batch", files={"files": ("a.jpeg", data)})
        assert batch.status_code == 200
        # Header names are case-insensitive.
        lower = client.post(
            "/predict", files={"file": ("a.jpeg", data)}, headers={"x-api-key": KEY}
        )
        assert lower.status_code == 200


def test_operational_routes_stay_open(keyed_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=30) as client:
        for path in (
            "/livez",
            "/health",
            "/model",
            "/metrics",
            "/docs",
            "/openapi.json",
            "/static/swagger-ui/swagger-ui-bundle.js",
        ):
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schema["paths"]["/predict"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert KEY not in keyed_server.log()


def test_no_key_configured_means_open(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.base_url}/predict",
        files={"file": ("a.jpeg", SMALL[0].read_bytes())},
        headers={"X-API-Key": "anything"},
        timeout=30,
    )
    assert response.status_code == 200
