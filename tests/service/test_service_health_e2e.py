"""Readiness and liveness over HTTP: missing, corrupt and valid bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server
from tests.support.xray_samples import SMALL


def _not_ready_checks(server: LiveServer) -> dict:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/livez").status_code == 200
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "failed"
        assert body["error"]["code"] == "model_load_failed"
        predict = client.post("/predict", files={"file": ("a.jpeg", SMALL[0].read_bytes())})
        assert predict.status_code == 503
        assert predict.json()["error"]["code"] == "model_not_ready"
        batch = client.post("/predict/batch", files={"files": ("a.jpeg", SMALL[0].read_bytes())})
        assert batch.status_code == 503
        assert batch.json()["error"]["code"] == "model_not_ready"
        model = client.get("/model")
        assert model.status_code == 503
        assert model.json()["error"]["code"] == "model_not_ready"
        metrics = client.get("/metrics").text
        assert "pneumoscreen_model_ready 0.0" in metrics
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
    return body


def _wait_failed(server: LiveServer) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{server.base_url}/health").json()["status"] == "failed":
            return
        time.sleep(0.05)
    raise AssertionError("model never reached the failed state")


def test_missing_bundle_is_503_with_reason_and_live(tmp_path: Path) -> None:
    with live_server(tmp_path / "no-such-bundle", wait_ready=False) as server:
        _wait_failed(server)
        body = _not_ready_checks(server)
        assert "no model bundle" in body["error"]["message"]


def test_corrupt_bundle_fails_sha256_check(tiny_bundle: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    onnx = corrupt / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    with live_server(corrupt, wait_ready=False) as server:
        _wait_failed(server)
        body = _not_ready_checks(server)
        assert "sha256" in body["error"]["message"]


def test_unloadable_onnx_with_matching_hash_fails_cleanly(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from service.bundle import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "model.onnx").write_bytes(b"this is not an onnx graph")
    meta = json.loads((broken / "model.json").read_text())
    meta["onnx_sha256"] = sha256_file(broken / "model.onnx")
    (broken / "model.json").write_text(json.dumps(meta))
    with live_server(broken, wait_ready=False) as server:
        _wait_failed(server)
        body = _not_ready_checks(server)
        assert "onnxruntime could not load" in body["error"]["message"]


def test_cuda_forced_without_cuda_fails_with_reason(tiny_bundle: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with live_server(tiny_bundle, env={"PROVIDERS": "cuda"}, wait_ready=False) as server:
        _wait_failed(server)
        assert "CUDAExecutionProvider" in _not_ready_checks(server)["error"]["message"]


def test_valid_bundle_is_ready_with_providers(server: LiveServer, tiny_bundle: Path) -> None:
    from service.bundle import read_bundle

    meta = read_bundle(tiny_bundle)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/livez").json() == {"status": "alive"}
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok"
        assert body["model"] == {
            "name": meta.name,
            "version": meta.version,
            "sha256": meta.onnx_sha256,
        }
        assert "CPUExecutionProvider" in body["providers"]
        assert "error" not in body


def test_cpu_provider_setting(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, env={"PROVIDERS": "cpu", "INTRA_OP_THREADS": "1"}) as server:
        body = httpx.get(f"{server.base_url}/health").json()
        assert body["providers"] == ["CPUExecutionProvider"]
