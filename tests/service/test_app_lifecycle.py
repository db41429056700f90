"""service.main and the model runner: loading, errors as JSON, several apps, quiet logs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.bundle import read_bundle
from service.config import Settings
from service.inference import ModelNotReady, ModelRunner
from service.main import create_app
from service.onnx_session import CPU
from tests.support.live_server import LiveServer
from tests.support.xray_samples import SMALL


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


def _predict_while_the_model_raises(
    tiny_bundle: Path, error: Exception
) -> tuple[list[httpx.Response], str]:
    """POST /predict twice, the model raising `error` first where a lone image runs at
    once (its decode worker, run_if_idle), then in the scheduler's queue (predict); the
    two answers and /metrics after them."""
    app = create_app(Settings(model_dir=tiny_bundle))
    runner: ModelRunner = app.state.runner
    runner.load()
    assert runner.ready

    async def in_the_queue(images: list[np.ndarray], **_: object) -> list:
        raise error

    def on_a_worker(images: list[np.ndarray], model: object) -> list:
        raise error

    runner.predict = in_the_queue  # type: ignore[method-assign]

    async def run() -> tuple[list[httpx.Response], str]:
        answers = []
        async with _client(app) as client:
            for idle_path in (on_a_worker, lambda images, model: None):
                runner.run_if_idle = idle_path  # type: ignore[method-assign]
                answers.append(
                    await client.post("/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())})
                )
            return answers, (await client.get("/metrics")).text

    try:
        return asyncio.run(run())
    finally:
        runner.close()


def test_model_not_ready_raised_anywhere_is_a_503_not_a_500(tiny_bundle: Path) -> None:
    """runner.require_ready() is the one readiness check; its ModelNotReady has a handler."""
    answers, _ = _predict_while_the_model_raises(
        tiny_bundle, ModelNotReady("the model is not ready: unloaded mid-request")
    )
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": {
                "code": "model_not_ready",
                "message": "the model is not ready: unloaded mid-request",
            }
        }
        assert response.headers["retry-after"] == "5"


def test_unexpected_exception_is_a_json_500_without_traceback(tiny_bundle: Path) -> None:
    answers, metrics = _predict_while_the_model_raises(
        tiny_bundle, RuntimeError("secret internal detail")
    )
    for response in answers:
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "code": "internal_error",
                "message": "unexpected server error; see the server log",
            }
        }
        assert "secret internal detail" not in response.text
    assert 'route="/predict",status="500"} 2.0' in metrics


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


def test_the_served_process_runs_blas_on_one_thread(tiny_bundle: Path) -> None:
    """service/blas.py: BLAS threads would spin on the cores the model and decoders use."""
    from threadpoolctl import threadpool_info

    create_app(Settings(model_dir=tiny_bundle))
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas, "numpy's BLAS was not found"
    assert {pool["num_threads"] for pool in blas} == {1}
