"""In-process tests of the pieces: scoring, settings, OpenAPI rewrite, states, 500s."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.bundle import read_bundle
from service.config import Settings
from service.docs import openapi_3_0
from service.inference import ModelNotReady, ModelRunner, score
from service.main import create_app
from service.onnx_session import CPU, CUDA, choose_providers
from service.scoring import normalise, positive_probability
from service.security import key_matches
from tests.support.bundle_factory import make_tiny_bundle
from tests.support.live_server import LiveServer
from tests.support.xray_samples import SMALL


def test_score_two_labels_follows_threshold(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path, threshold=0.41)
    at = score(meta, np.array([0.59, 0.41], dtype=np.float32))
    assert at.screen_positive and at.label == "PNEUMONIA"
    below = score(meta, np.array([0.6, 0.4], dtype=np.float32))
    assert not below.screen_positive and below.label == "NORMAL"
    # float32 outputs that do not quite sum to 1 are renormalised.
    odd = score(meta, np.array([0.3000001, 0.7000002], dtype=np.float32))
    assert sum(odd.probabilities.values()) == pytest.approx(1.0, abs=1e-12)
    assert odd.positive_probability == odd.probabilities["PNEUMONIA"]


def test_score_three_labels(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path, labels=("NORMAL", "BACTERIAL", "VIRAL"), threshold=0.5)
    # NORMAL is the argmax, but BACTERIAL + VIRAL = 0.55 >= 0.5: positive, most likely VIRAL.
    positive = score(meta, np.array([0.45, 0.25, 0.30]))
    assert positive.screen_positive and positive.label == "VIRAL"
    assert positive.positive_probability == pytest.approx(0.55)
    negative = score(meta, np.array([0.6, 0.3, 0.1]))
    assert not negative.screen_positive and negative.label == "NORMAL"


@pytest.mark.parametrize("labels", [("NORMAL", "PNEUMONIA"), ("NORMAL", "BACTERIAL", "VIRAL")])
def test_score_uses_the_training_definition_of_p_positive(
    tmp_path: Path, labels: tuple[str, ...]
) -> None:
    """The service decides with exactly the value the threshold was chosen on."""
    meta = make_tiny_bundle(tmp_path, labels=labels, threshold=0.5)
    rows = np.random.default_rng(7).dirichlet(np.ones(len(labels)), 200).astype(np.float32)
    rows[::3] *= np.float32(1.0000003)  # float32 rows that do not quite sum to 1
    expected = positive_probability(rows, meta.positive_indices())
    probabilities = normalise(rows)
    for row, p_positive, row_probabilities in zip(rows, expected, probabilities, strict=True):
        scored = score(meta, row)
        assert scored.positive_probability == float(p_positive)
        assert list(scored.probabilities.values()) == [float(p) for p in row_probabilities]
        assert scored.screen_positive == (float(p_positive) >= meta.threshold)
    with pytest.raises(ValueError, match="no usable probabilities"):
        score(meta, np.zeros(len(labels), dtype=np.float32))


def test_every_image_error_code_has_its_documented_status() -> None:
    from service import preprocessing
    from service.errors import ERROR_CODES, IMAGE_ERROR_STATUS, image_error

    classes = [
        obj
        for obj in vars(preprocessing).values()
        if isinstance(obj, type) and issubclass(obj, preprocessing.ImageError)
    ]
    assert {cls.code for cls in classes} == set(IMAGE_ERROR_STATUS)
    for cls in classes:
        api = image_error(cls("x"))
        assert (api.status_code, api.code) == (ERROR_CODES[cls.code][0], cls.code)
    assert IMAGE_ERROR_STATUS["image_too_large"] == 413
    assert IMAGE_ERROR_STATUS["unsupported_media_type"] == 415


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_TYPES", " JPG , png ")
    monkeypatch.setenv("api_key", "")
    monkeypatch.setenv("MAX_BATCH_FILES", "7")
    monkeypatch.setenv("PROVIDERS", "cpu")
    settings = Settings()
    assert settings.allowed_types == ["jpeg", "png"]
    assert settings.api_key is None
    assert settings.max_batch_files == 7
    assert settings.decode_limits().allowed_formats == frozenset({"jpeg", "png"})
    monkeypatch.setenv("ALLOWED_TYPES", "jpeg,gif")
    with pytest.raises(ValidationError):
        Settings()


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", ["docs/api.md", "README.md"])
def test_every_setting_is_documented(doc: str) -> None:
    """Each setting has a row `| `NAME` | default | description... |` in the docs, whose
    text includes the description in service/config.py."""
    text = (REPO / doc).read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        row = re.search(rf"^\| `{name.upper()}` \|[^|]*\|(.*)\|$", text, re.MULTILINE)
        assert row, f"{doc} has no row for {name.upper()}"
        assert field.description in row.group(1), (doc, name, row.group(1))


def test_log_levels_accepted_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import LOG_LEVELS

    for doc in ("docs/api.md", "README.md"):
        row = re.search(r"^\| `LOG_LEVEL` \|.*$", (REPO / doc).read_text(), re.MULTILINE)
        assert row, doc
        documented = set(re.findall(r"\b(critical|error|warning|info|debug|trace)\b", row.group(0)))
        assert documented == set(LOG_LEVELS), doc
    for level in LOG_LEVELS:
        monkeypatch.setenv("LOG_LEVEL", level.upper())
        assert Settings().log_level == level
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError, match="trace"):
        Settings()


def test_model_card_example_uses_the_bundle_metric_names() -> None:
    from service.schemas import ModelInfo

    [example] = ModelInfo.model_fields["validation_metrics"].examples
    # export/onnx_export.py writes training.metrics.binary_metrics' names.
    assert set(example) <= {
        "auc",
        "sensitivity",
        "specificity",
        "accuracy",
        "precision",
        "f1",
        "n",
        "n_positive",
        "confusion_matrix",
    }


def test_providers_choice() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        choose_providers("cuda", [CPU])


def test_key_comparison() -> None:
    assert key_matches("abc", "abc")
    assert not key_matches("abd", "abc")
    assert not key_matches(None, "abc")
    assert not key_matches("", "abc")
    assert key_matches("ключ", "ключ")


def test_openapi_rewrite_to_3_0() -> None:
    rewritten = openapi_3_0(
        {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "A"},
            "b": {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]},
            "c": {"type": "string", "contentMediaType": "application/octet-stream"},
            "d": {"type": "integer", "examples": [3, 4]},
            "e": {"const": "ok"},
        }
    )
    assert rewritten["a"] == {"type": "string", "nullable": True, "title": "A"}
    assert rewritten["b"] == {"allOf": [{"$ref": "#/x"}], "nullable": True}
    assert rewritten["c"] == {"type": "string", "format": "binary"}
    assert rewritten["d"] == {"type": "integer", "example": 3}
    assert rewritten["e"] == {"enum": ["ok"]}


def _client(app) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def test_while_loading_liveness_answers_and_predict_is_503(tiny_bundle: Path) -> None:
    # Without the lifespan the model never starts loading: the "loading" state, frozen.
    app = create_app(Settings(model_dir=tiny_bundle))

    async def run() -> None:
        async with _client(app) as client:
            assert (await client.get("/livez")).status_code == 200
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "loading"
            predict = await client.post(
                "/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())}
            )
            batch = await client.post(
                "/predict/batch", files={"files": ("a.jpeg", SMALL[0].read_bytes())}
            )
            model = await client.get("/model")
            for response in (predict, batch, model):
                assert response.status_code == 503, response.request.url
                assert response.json()["error"]["code"] == "model_not_ready"
                assert "still loading" in response.json()["error"]["message"]
                assert response.headers["retry-after"] == "5", response.request.url

    asyncio.run(run())


def test_model_not_ready_raised_anywhere_is_a_503_not_a_500(tiny_bundle: Path) -> None:
    """runner.require_ready() is the one readiness check; its ModelNotReady has a handler."""
    app = create_app(Settings(model_dir=tiny_bundle))
    runner: ModelRunner = app.state.runner
    runner.load()
    assert runner.ready

    async def unloaded(images: list[np.ndarray], **_: object) -> list:
        raise ModelNotReady("the model is not ready: unloaded mid-request")

    runner.predict = unloaded  # type: ignore[method-assign]

    async def run() -> None:
        async with _client(app) as client:
            response = await client.post(
                "/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())}
            )
            assert response.status_code == 503, response.text
            assert response.json() == {
                "error": {
                    "code": "model_not_ready",
                    "message": "the model is not ready: unloaded mid-request",
                }
            }
            assert response.headers["retry-after"] == "5"

    asyncio.run(run())
    runner.close()


def test_unexpected_exception_is_a_json_500_without_traceback(tiny_bundle: Path) -> None:
    app = create_app(Settings(model_dir=tiny_bundle))
    runner: ModelRunner = app.state.runner
    runner.load()
    assert runner.ready

    async def explode(images: list[np.ndarray], **_: object) -> list:
        raise RuntimeError("secret internal detail")

    runner.predict = explode  # type: ignore[method-assign]

    async def run() -> None:
        async with _client(app) as client:
            response = await client.post(
                "/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())}
            )
            assert response.status_code == 500
            assert response.json() == {
                "error": {
                    "code": "internal_error",
                    "message": "unexpected server error; see the server log",
                }
            }
            assert "secret internal detail" not in response.text
            metrics = (await client.get("/metrics")).text
            assert 'route="/predict",status="500"' in metrics

    asyncio.run(run())
    runner.close()


def test_many_apps_in_one_process(tiny_bundle: Path) -> None:
    # Per-app registries: creating several apps raises no "Duplicated timeseries", and one
    # app's requests never show in another's counters.
    apps = [create_app(Settings(model_dir=tiny_bundle)) for _ in range(3)]
    line = 'pneumoscreen_http_requests_total{method="GET",route="/livez",status="200"}'

    def livez_count(metrics_text: str) -> float:
        for row in metrics_text.splitlines():
            if row.startswith(line):
                return float(row.split()[-1])
        return 0.0

    async def run() -> list[float]:
        counts = []
        for index, app in enumerate(apps):
            async with _client(app) as client:
                for _ in range(index + 1):
                    assert (await client.get("/livez")).status_code == 200
                counts.append(livez_count((await client.get("/metrics")).text))
        return counts

    assert asyncio.run(run()) == [1.0, 2.0, 3.0]
    for app in apps:
        app.state.runner.close()


def test_logs_hold_no_filenames_or_contents(server: LiveServer) -> None:
    name = "Doe-Jane-1999-03-04.jpeg"
    data = SMALL[0].read_bytes()
    httpx.post(f"{server.base_url}/predict", files={"file": (name, data)})
    httpx.post(f"{server.base_url}/predict", files={"file": (name, b"patient: Jane Doe")})
    log = server.log()
    assert "Doe-Jane" not in log
    assert "Jane Doe" not in log
    assert '"route": "/predict"' in log and '"n_files": 1' in log


def test_runner_serves_the_bundle_it_verified(tiny_bundle: Path) -> None:
    runner = ModelRunner(Settings(model_dir=tiny_bundle, providers="cpu"))
    with pytest.raises(ModelNotReady, match="still loading"):
        runner.require_ready()
    runner.load()
    try:
        assert runner.state == "ready" and runner.error is None
        assert runner.require_ready() == read_bundle(tiny_bundle, verify=True)
        assert runner.providers == [CPU]
    finally:
        runner.close()


def test_every_error_code_is_in_the_docs_table_with_its_status() -> None:
    from service.errors import ERROR_CODES

    text = (REPO / "docs/api.md").read_text()
    documented = {
        code: int(status)
        for status, code in re.findall(r"^\| (\d{3})\s+\| `([a-z_]+)`", text, re.MULTILINE)
    }
    assert documented  # the table is there
    for code, (status, _) in ERROR_CODES.items():
        assert documented.get(code) == status, f"docs/api.md: {code} should be {status}"


def test_scheduler_settings_reach_the_runner(tiny_bundle: Path) -> None:
    settings = Settings(
        model_dir=tiny_bundle,
        max_queue=7,
        max_batch_size=3,
        max_batch_wait_ms=2.5,
        inference_threads=2,
    )
    runner = ModelRunner(settings)
    try:
        assert runner.admission.max_images == 7
        assert runner.scheduler.max_batch_size == 3
        assert runner.scheduler.max_wait_s == pytest.approx(0.0025)
        assert runner.executor._max_workers == 2
    finally:
        runner.close()
