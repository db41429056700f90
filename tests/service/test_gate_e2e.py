"""The input gate and heatmaps over real HTTP, on a format 2 bundle whose gate was fitted
on the fixture X-rays' features (tests/support/bundle_factory.py), and old-bundle behaviour."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.gate_eval import generated_images
from tests.support.dicom_factory import dicom_bytes
from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import FULLRES, SMALL, reference_probabilities

GATE_CODES = {"not_chest_xray", "unsupported_view", "rotated_image"}


def _post(server: LiveServer, data: bytes, name: str = "x.png", **params: str) -> httpx.Response:
    return httpx.post(
        server.url("/predict"), files={"file": (name, data)}, params=params, timeout=60
    )


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _decode_png(payload: dict) -> Image.Image:
    assert payload["media_type"] == "image/png"
    image = Image.open(io.BytesIO(base64.b64decode(payload["data"])))
    image.load()
    return image


def test_health_and_model_card_describe_the_gate(
    gated_server: LiveServer, gated_bundle: Path
) -> None:
    from service.bundle import read_bundle

    health = httpx.get(gated_server.url("/health")).json()
    assert health["gate"] == "on" and health["heatmaps"] == "available"
    card = httpx.get(gated_server.url("/model")).json()
    meta = read_bundle(gated_bundle)
    assert card["heatmaps"] == "available"
    gate = card["gate"]
    assert gate["status"] == "on" and set(gate["codes"]) == GATE_CODES
    assert gate["threshold"] == meta.gate.threshold
    assert gate["acceptance"] == meta.gate.acceptance
    assert gate["acceptance"]["validation"]["n"] == 4
    assert any("ViewPosition" in check for check in gate["checks"])


def test_fixture_xrays_are_accepted_and_scored_as_before(
    gated_server: LiveServer, gated_bundle: Path
) -> None:
    # The full-resolution fixtures were not used to fit the gate.
    for path in FULLRES:
        response = _post(gated_server, path.read_bytes(), path.name)
        assert response.status_code == 200, (path.name, response.text)
        body = response.json()
        assert "heatmap" not in body  # only with explain=true
        expected = reference_probabilities(gated_bundle, path.read_bytes())
        for label, p in expected.items():
            assert body["probabilities"][label] == pytest.approx(p, abs=1e-6)


@pytest.mark.parametrize(
    "name,data", generated_images(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_generated_non_xrays_are_refused(gated_server: LiveServer, name: str, data: bytes) -> None:
    response = _post(gated_server, data)
    assert response.status_code == 422, (name, response.text)
    error = response.json()["error"]
    assert error["code"] == "not_chest_xray", (name, error)
    assert error["message"]


def test_cheap_checks_say_why(gated_server: LiveServer) -> None:
    colour = Image.new("RGB", (300, 300), (200, 40, 40))
    message = _post(gated_server, _jpeg(colour)).json()["error"]["message"]
    assert "coloured" in message
    blank = _jpeg(Image.new("L", (300, 300), 90))
    assert "blank" in _post(gated_server, blank).json()["error"]["message"]
    xray = Image.open(FULLRES[0]).convert("L")
    wide = xray.resize((xray.width * 2, xray.height // 2))
    assert "aspect ratio" in _post(gated_server, _jpeg(wide)).json()["error"]["message"]


def test_rotated_xrays_are_never_scored(gated_server: LiveServer) -> None:
    codes = []
    for path in FULLRES:
        image = Image.open(path).convert("L")
        for turn in (
            Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_180,
            Image.Transpose.ROTATE_270,
        ):
            response = _post(gated_server, _jpeg(image.transpose(turn)), path.name)
            assert response.status_code == 422, (path.name, turn, response.text)
            codes.append(response.json()["error"]["code"])
    assert set(codes) <= {"rotated_image", "not_chest_xray"}
    # Most are recognised as rotated X-rays (their own code), not just as "not an X-ray".
    assert codes.count("rotated_image") >= 0.75 * len(codes), codes


def _xray_pixels() -> np.ndarray:
    return np.asarray(Image.open(FULLRES[0]).convert("L"))


@pytest.mark.parametrize(
    "tags,code",
    [
        ({}, None),
        ({"Modality": "CT"}, "not_chest_xray"),
        ({"Modality": "MR"}, "not_chest_xray"),
        ({"BodyPartExamined": "HAND"}, "not_chest_xray"),
        ({"ViewPosition": "LL"}, "unsupported_view"),
        ({"ViewPosition": "LATERAL"}, "unsupported_view"),
        ({"ViewPosition": "AP"}, None),
        ({"Modality": "CR", "BodyPartExamined": "THORAX"}, None),
    ],
)
def test_dicom_tag_rules(gated_server: LiveServer, tags: dict[str, str], code: str | None) -> None:
    from tests.support.dicom_factory import make_dataset, to_bytes

    dataset = make_dataset(_xray_pixels())
    for name, value in tags.items():
        setattr(dataset, name, value)
    response = _post(gated_server, to_bytes(dataset), "x.dcm")
    if code is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert next(iter(tags.values())) in error["message"]


def test_explain_adds_a_heatmap_sized_to_the_original(gated_server: LiveServer) -> None:
    path = FULLRES[0]
    with Image.open(path) as original:
        original_size = original.size
    response = _post(gated_server, path.read_bytes(), path.name, explain="true")
    assert response.status_code == 200, response.text
    body = response.json()
    heatmap = body["heatmap"]
    image = _decode_png(heatmap)
    assert image.size == original_size == (heatmap["width"], heatmap["height"])
    rgba = np.asarray(image.convert("RGBA"))
    assert rgba[..., 3].max() == 255, "the strongest positive evidence is opaque"
    assert "preview" not in body  # a JPEG needs none


def test_explain_on_dicom_adds_a_preview(gated_server: LiveServer) -> None:
    pixels = _xray_pixels()
    response = _post(gated_server, dicom_bytes(pixels), "x.dcm", explain="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert _decode_png(body["heatmap"]).size == (pixels.shape[1], pixels.shape[0])
    preview = _decode_png(body["preview"])
    assert preview.mode == "L" and max(preview.size) <= 1024
    assert abs(preview.size[0] / preview.size[1] - pixels.shape[1] / pixels.shape[0]) < 0.01


def test_batch_mixes_xrays_and_refusals(gated_server: LiveServer) -> None:
    generated = dict(generated_images())
    rotated = _jpeg(Image.open(FULLRES[1]).convert("L").transpose(Image.Transpose.ROTATE_180))
    files = [
        ("files", ("xray.jpeg", FULLRES[0].read_bytes())),
        ("files", ("noise.png", generated["noise uniform"])),
        ("files", ("rotated.jpeg", rotated)),
        ("files", ("page.png", generated["text page 0"])),
        ("files", ("xray2.jpeg", FULLRES[2].read_bytes())),
    ]
    response = httpx.post(
        gated_server.url("/predict/batch"), files=files, params={"explain": "true"}, timeout=60
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [name for _, (name, _) in files]
    assert results[0]["label"] in {"NORMAL", "PNEUMONIA"} and "heatmap" in results[0]
    assert results[4]["label"] in {"NORMAL", "PNEUMONIA"}
    with Image.open(FULLRES[2]) as original:  # .size alone leaves the file open
        assert _decode_png(results[4]["heatmap"]).size == original.size
    for index in (1, 2, 3):
        assert results[index]["error"]["code"] in GATE_CODES, results[index]
        assert "label" not in results[index] and "heatmap" not in results[index]
    assert results[2]["error"]["code"] in {"rotated_image", "not_chest_xray"}
    metrics = httpx.get(gated_server.url("/metrics")).text
    assert 'pneumoscreen_image_errors_total{code="not_chest_xray"}' in metrics


def test_gate_can_be_switched_off(gated_bundle: Path) -> None:
    noise = dict(generated_images())["noise uniform"]
    with live_server(gated_bundle, env={"GATE_ENABLED": "false"}) as server:
        assert httpx.get(server.url("/health")).json()["gate"] == "off"
        assert httpx.get(server.url("/model")).json()["gate"]["status"] == "off"
        response = _post(server, noise, explain="true")
        assert response.status_code == 200, response.text
        assert "heatmap" in response.json()


def test_old_bundle_is_served_as_before(server: LiveServer) -> None:
    """A format 1 bundle: no gate (noise is scored), no heatmaps, and both say so."""
    health = httpx.get(server.url("/health")).json()
    assert health["gate"] == "unavailable" and health["heatmaps"] == "unavailable"
    card = httpx.get(server.url("/model")).json()
    assert card["gate"]["status"] == "unavailable" and card["heatmaps"] == "unavailable"
    noise = dict(generated_images())["noise uniform"]
    assert _post(server, noise).status_code == 200
    response = _post(server, SMALL[0].read_bytes(), "a.jpeg", explain="true")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "explain_unavailable"
    batch = httpx.post(
        server.url("/predict/batch"),
        params={"explain": "true"},
        files=[("files", ("a.jpeg", SMALL[0].read_bytes()))],
        timeout=30,
    )
    assert batch.status_code == 422


def test_openapi_lists_the_gate_codes(gated_server: LiveServer) -> None:
    schema = httpx.get(gated_server.url("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    described = predict["responses"]["422"]["description"]
    for code in (*GATE_CODES, "explain_unavailable"):
        assert f"`{code}`" in described
    assert any(p["name"] == "explain" for p in predict["parameters"])
    properties = schema["components"]["schemas"]["Prediction"]["properties"]
    assert "heatmap" in properties and "preview" in properties
