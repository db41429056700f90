"""/model, /metrics, /openapi.json and /docs over HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.support.live_server import LiveServer
from tests.support.xray_samples import SMALL


def test_model_card(server: LiveServer, tiny_bundle: Path) -> None:
    from service.bundle import read_bundle

    meta = read_bundle(tiny_bundle)
    body = httpx.get(f"{server.base_url}/model").json()
    assert body["labels"] == meta.labels
    assert body["threshold"] == meta.threshold
    assert body["input"]["height"] == body["input"]["width"] == 64
    assert body["validation_metrics"] == meta.validation_metrics
    assert "not a diagnosis" in body["intended_use"]
    assert body["sha256"] == meta.onnx_sha256
    assert body["positive_label"] == "PNEUMONIA" and body["negative_label"] == "NORMAL"
    # Every field of the card is the bundle's own (the card is not copied field by field).
    card = meta.model_dump(mode="json")
    for name, value in body.items():
        if name == "sha256":
            assert value == card["onnx_sha256"]
        elif name == "providers":
            assert value == ["CPUExecutionProvider"]
        elif name == "created_at":
            assert value.replace("Z", "+00:00") == card[name].replace("Z", "+00:00")
        elif name == "last_reload":  # the server's, not the bundle's: the start-up load
            assert value["ok"] is True and value["trigger"] == "startup"
            assert value["serving"]["sha256"] == card["onnx_sha256"]
        elif name in ("gate", "heatmaps"):
            # The service's own account: a format 1 bundle has neither.
            assert card["format_version"] == 1
            assert (value if name == "heatmaps" else value["status"]) == "unavailable"
        else:
            assert value == card[name], name
    assert body["input"] == card["input"]


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests_images_and_batches(server: LiveServer) -> None:
    url = server.base_url
    before = httpx.get(f"{url}/metrics").text
    data = SMALL[0].read_bytes()
    label = httpx.post(f"{url}/predict", files={"file": ("a.jpeg", data)}).json()["label"]
    httpx.post(f"{url}/predict", files={"file": ("a.txt", b"text")})
    httpx.post(f"{url}/predict/batch", files=[("files", ("a.jpeg", data))] * 2)
    after = httpx.get(f"{url}/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def delta(name: str) -> float:
        return _value(text, name) - _value(before, name)

    ok = 'pneumoscreen_http_requests_total{method="POST",route="/predict",status="200"}'
    bad = 'pneumoscreen_http_requests_total{method="POST",route="/predict",status="415"}'
    batch = 'pneumoscreen_http_requests_total{method="POST",route="/predict/batch",status="200"}'
    assert delta(ok) == 1 and delta(bad) == 1 and delta(batch) == 1
    assert delta(f'pneumoscreen_images_predicted_total{{label="{label}"}}') == 3
    assert delta('pneumoscreen_image_errors_total{code="unsupported_media_type"}') == 1
    # One run for /predict; the batch's two images one run per worker (service.scheduler).
    workers = _value(text, "pneumoscreen_model_workers")
    assert workers >= 1
    assert delta("pneumoscreen_batch_size_count") == 1 + min(2, workers)
    assert delta("pneumoscreen_batch_size_sum") == 3
    latency = 'pneumoscreen_http_request_duration_seconds_count{method="POST",route="/predict"}'
    assert delta(latency) == 2
    assert "pneumoscreen_inference_duration_seconds_bucket" in text
    assert "pneumoscreen_model_ready 1.0" in text
    assert re.search(r'pneumoscreen_model_info\{.*name="tiny-test-model".*\} 1.0', text)
    assert 'providers="CPUExecutionProvider"' in text
    # Unknown paths share one series instead of one each.
    # (The path is looked for as a label; a bare number could be in a float, 0.0012345...)
    httpx.get(f"{url}/no/such/path/12345")
    assert "/no/such/path" not in httpx.get(f"{url}/metrics").text


def test_openapi_documents_routes_and_disclaimer(server: LiveServer) -> None:
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    # Swagger UI 4 (vendored, offline) renders OpenAPI 3.0, not 3.1.
    assert schema["openapi"].startswith("3.0")
    description = schema["info"]["description"].lower()
    assert "screening aid" in description and "not a diagnosis" in description
    paths = schema["paths"]
    for path, method in [
        ("/predict", "post"),
        ("/predict/batch", "post"),
        ("/health", "get"),
        ("/livez", "get"),
        ("/model", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
    single = paths["/predict"]["post"]
    form = single["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"] == {
        **form["properties"]["file"],
        "type": "string",
        "format": "binary",
    }
    assert form["required"] == ["file"]
    batch_form = paths["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]
    assert batch_form["properties"]["files"]["items"]["format"] == "binary"
    for status in ("200", "400", "401", "413", "415", "422", "503"):
        assert status in single["responses"], status
    example = single["responses"]["200"]["content"]["application/json"]["schema"]
    assert example  # a $ref to Prediction, with examples
    prediction = schema["components"]["schemas"]["Prediction"]
    assert prediction["example"]["label"] == "PNEUMONIA"
    text = httpx.get(f"{server.base_url}/openapi.json").text
    compact = text.replace(" ", "")
    assert '{"type":"null"}' not in compact and '{"nullable":true}' not in compact
    assert "contentMediaType" not in text


def test_docs_are_served_offline(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        html = page.text
        assert "swagger-ui" in html
        # No CDN: every asset the page loads comes from this server.
        assert not re.search(r"""(src|href)=["']https?://""", html)
        for asset in re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", html):
            response = client.get(asset)
            assert response.status_code == 200, asset
            assert len(response.content) > 100, asset
        assert "/openapi.json" in html
