"""End to end over HTTP against the real app under uvicorn: /predict and /predict/batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.bundle_factory import make_tiny_bundle
from tests.support.dicom_factory import FAKE_PATIENT_ID, dicom_bytes
from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import (
    FULLRES,
    SMALL,
    png_bytes,
    reference_probabilities,
    tiny_png,
)


def _assert_prediction(body: dict, expected: dict[str, float], threshold: float) -> None:
    assert set(body["probabilities"]) == set(expected)
    for label, p in expected.items():
        assert body["probabilities"][label] == pytest.approx(p, abs=1e-6)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert body["threshold"] == threshold
    positive = body["positive_probability"]
    assert body["screen_positive"] is (positive >= threshold)


def test_predict_fullres_jpeg_matches_direct_onnxruntime(
    server: LiveServer, tiny_bundle: Path
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for path in FULLRES:
            data = path.read_bytes()
            response = client.post("/predict", files={"file": (path.name, data, "image/jpeg")})
            assert response.status_code == 200, response.text
            body = response.json()
            expected = reference_probabilities(tiny_bundle, data)
            _assert_prediction(body, expected, 0.5)
            assert body["positive_probability"] == pytest.approx(expected["PNEUMONIA"], abs=1e-6)
            assert body["label"] == ("PNEUMONIA" if expected["PNEUMONIA"] >= 0.5 else "NORMAL")
            assert body["model"] == {"name": "tiny-test-model", "version": "0.0.1"}
            assert body["inference_ms"] >= 0


def test_predict_224_jpeg_png_and_dicom(server: LiveServer, tiny_bundle: Path) -> None:
    grey = np.asarray(Image.open(FULLRES[0]).convert("L"))
    samples = {
        "small.jpeg": SMALL[0].read_bytes(),
        "grey.png": png_bytes(FULLRES[1]),
        "rgb.png": png_bytes(FULLRES[2], "RGB"),
        "sixteen.png": png_bytes(FULLRES[3], "I;16"),
        "chest.dcm": dicom_bytes(grey),
    }
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for name, data in samples.items():
            # The declared type is deliberately wrong: the server sniffs the bytes.
            response = client.post(
                "/predict", files={"file": (name, data, "application/octet-stream")}
            )
            assert response.status_code == 200, (name, response.text)
            _assert_prediction(response.json(), reference_probabilities(tiny_bundle, data), 0.5)
    # Nothing from the DICOM header reaches the server log.
    assert FAKE_PATIENT_ID not in server.log()


def test_brighter_image_scores_higher(server: LiveServer) -> None:
    def png(value: int) -> bytes:
        import io

        buffer = io.BytesIO()
        Image.new("L", (128, 128), value).save(buffer, format="PNG")
        return buffer.getvalue()

    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        dark = client.post("/predict", files={"file": ("d.png", png(0))}).json()
        bright = client.post("/predict", files={"file": ("b.png", png(255))}).json()
    assert dark["label"] == "NORMAL" and dark["screen_positive"] is False
    assert bright["label"] == "PNEUMONIA" and bright["screen_positive"] is True
    assert bright["positive_probability"] > dark["positive_probability"]


def test_batch_keeps_order_and_isolates_bad_files(server: LiveServer, tiny_bundle: Path) -> None:
    good = [FULLRES[0].read_bytes(), SMALL[0].read_bytes(), png_bytes(FULLRES[4])]
    files = [
        ("files", ("a.jpeg", good[0], "image/jpeg")),
        ("files", ("notes.txt", b"not an image at all", "text/plain")),
        ("files", ("b.jpeg", good[1], "image/jpeg")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("truncated.jpeg", good[0][:2000], "image/jpeg")),
        ("files", ("c.png", good[2], "image/png")),
    ]
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        before = client.get("/metrics").text
        response = client.post("/predict/batch", files=files)
        assert response.status_code == 200, response.text
        body = response.json()
        metrics = client.get("/metrics").text
    results = body["results"]
    assert [r["filename"] for r in results] == [f[1][0] for f in files]
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[3]["error"]["code"] == "empty_file"
    assert results[4]["error"]["code"] == "invalid_image"
    for index, data in zip((0, 2, 5), good, strict=True):
        assert "error" not in results[index]
        _assert_prediction(results[index], reference_probabilities(tiny_bundle, data), 0.5)
    for index in (1, 3, 4):
        assert set(results[index]) == {"filename", "error"}
    assert body["model"]["name"] == "tiny-test-model"

    # The three good images, and only they, went to the model: as one batch of 3 with one
    # model worker, cut into one chunk per worker with more (2 and 1 with two).
    def runs(size: float) -> float:
        name = f'pneumoscreen_batch_size_bucket{{le="{size}"}}'
        return _sample(metrics, name) - _sample(before, name)

    workers = _sample(metrics, "pneumoscreen_model_workers")
    assert (
        _sample(metrics, "pneumoscreen_batch_size_sum")
        - _sample(before, "pneumoscreen_batch_size_sum")
        == 3
    )
    expected = {1: (0, 0, 1), 2: (1, 2, 2)}.get(int(workers), (3, 3, 3))
    assert (runs(1.0), runs(2.0), runs(4.0)) == expected


def test_batch_of_only_bad_files_is_still_200(server: LiveServer) -> None:
    files = [("files", ("x.gif", b"GIF89a" + b"\0" * 64)), ("files", ("y.pdf", b"%PDF-1.4"))]
    response = httpx.post(f"{server.base_url}/predict/batch", files=files, timeout=30)
    assert response.status_code == 200
    codes = [r["error"]["code"] for r in response.json()["results"]]
    assert codes == ["unsupported_media_type", "unsupported_media_type"]


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("empty.jpeg", b"", 400, "empty_file"),
        ("text.jpeg", b"hello, this is text", 415, "unsupported_media_type"),
        ("fake.jpeg", b"\xff\xd8\xff" + b"\x00" * 500, 400, "invalid_image"),
        ("tiny.png", None, 422, "image_too_small"),
    ],
)
def test_bad_single_file_gets_json_error(
    server: LiveServer, name: str, data: bytes | None, status: int, code: str
) -> None:
    from tests.support.xray_samples import tiny_png

    payload = tiny_png(8) if data is None else data
    response = httpx.post(f"{server.base_url}/predict", files={"file": (name, payload)}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert "Traceback" not in response.text


def test_request_shape_errors(server: LiveServer) -> None:
    data = SMALL[0].read_bytes()
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        wrong_field = client.post("/predict", files={"image": ("a.jpeg", data)})
        no_body = client.post("/predict")
        json_body = client.post("/predict", json={"file": "abc"})
        text_field = client.post("/predict", data={"file": "not a file"})
        two_files = client.post(
            "/predict", files=[("file", ("a.jpeg", data)), ("file", ("b.jpeg", data))]
        )
        batch_wrong_field = client.post("/predict/batch", files={"file": ("a.jpeg", data)})
        missing = client.get("/nope")
        wrong_method = client.get("/predict")
        malformed = client.post(
            "/predict",
            content=b"--xyz\r\nnot really multipart",
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
    for response in (wrong_field, no_body, json_body, text_field, batch_wrong_field):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "missing_file"
    assert two_files.status_code == 413
    assert two_files.json()["error"]["code"] == "too_many_files"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    # docs/api.md: a malformed multipart body is 400 invalid_multipart.
    assert malformed.status_code == 400, malformed.text
    assert malformed.json()["error"]["code"] == "invalid_multipart"


def _sample(metrics_text: str, prefix: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics")


@pytest.fixture(scope="module")
def three_label_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, Path]]:
    directory = tmp_path_factory.mktemp("three-label")
    make_tiny_bundle(directory, labels=("NORMAL", "BACTERIAL", "VIRAL"), threshold=0.4)
    with live_server(directory) as running:
        yield running, directory


def test_three_label_bundle(three_label_server: tuple[LiveServer, Path]) -> None:
    server, directory = three_label_server
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        model = client.get("/model").json()
        assert model["labels"] == ["NORMAL", "BACTERIAL", "VIRAL"]
        assert model["positive_labels"] == ["BACTERIAL", "VIRAL"]
        for path in FULLRES[:3] + SMALL[:2]:
            data = path.read_bytes()
            body = client.post("/predict", files={"file": (path.name, data)}).json()
            expected = reference_probabilities(directory, data)
            _assert_prediction(body, expected, 0.4)
            positive = expected["BACTERIAL"] + expected["VIRAL"]
            assert body["positive_probability"] == pytest.approx(positive, abs=1e-6)
            if positive >= 0.4:
                assert body["label"] == max(("BACTERIAL", "VIRAL"), key=expected.__getitem__)
            else:
                assert body["label"] == "NORMAL"
        batch = client.post(
            "/predict/batch", files=[("files", (p.name, p.read_bytes())) for p in SMALL[:3]]
        ).json()
        assert len(batch["results"]) == 3
        assert all(
            set(r["probabilities"]) == {"NORMAL", "BACTERIAL", "VIRAL"} for r in batch["results"]
        )


def test_concurrent_requests_agree(server: LiveServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = FULLRES[2].read_bytes()

    def call(_: int) -> dict:
        response = httpx.post(
            f"{server.base_url}/predict", files={"file": ("a.jpeg", data)}, timeout=60
        )
        assert response.status_code == 200, response.text
        return response.json()["probabilities"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(call, range(16)))
    assert all(answer == answers[0] for answer in answers)
    assert httpx.get(f"{server.base_url}/livez").status_code == 200


def _server_timing(response: httpx.Response) -> dict[str, float]:
    stages = {}
    for entry in response.headers["server-timing"].split(","):
        name, _, duration = entry.strip().partition(";dur=")
        stages[name] = float(duration)
    return stages


def test_answers_say_where_their_time_went(server: LiveServer) -> None:
    """Server-Timing: decode, queue, model and app for every predict answer (also an
    error found after decoding); the stages fit inside the app's time."""
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        single = client.post("/predict", files={"file": ("a.jpeg", FULLRES[0].read_bytes())})
        batch = client.post(
            "/predict/batch",
            files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in FULLRES[:3]],
        )
        tiny = client.post("/predict", files={"file": ("t.png", tiny_png(8))})
        livez = client.get("/livez")
    assert single.status_code == batch.status_code == 200
    for response in (single, batch):
        stages = _server_timing(response)
        assert list(stages) == ["decode", "queue", "model", "app"]
        assert stages["decode"] > 0 and stages["model"] > 0 and stages["queue"] >= 0
        assert stages["model"] <= stages["app"] <= response.elapsed.total_seconds() * 1000
    # One image's stages follow one another; a batch's images decode side by side.
    stages = _server_timing(single)
    assert stages["decode"] + stages["model"] <= stages["app"] + 0.05
    assert single.json()["inference_ms"] == pytest.approx(_server_timing(single)["model"], abs=0.01)
    assert tiny.status_code == 422  # image_too_small, found by the decoder: nothing ran
    assert _server_timing(tiny)["model"] == 0
    assert "server-timing" not in livez.headers  # only requests that have stages
