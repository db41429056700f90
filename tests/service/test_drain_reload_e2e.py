"""Graceful drain (SIGTERM) and hot reload (POST /admin/reload, SIGHUP) of a real
`pneumoscreen serve` process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.main import create_app
from tests.support.bundle_factory import make_tiny_bundle
from tests.support.live_server import LiveServer, live_server, raw_multipart_request
from tests.support.xray_samples import SMALL

KEY = "admin-test-key"
PATIENCE_S = 60.0


def _partial_predict(port: int, image: bytes) -> tuple[socket.socket, bytes]:
    """A /predict request whose head and first half of body are sent; returns the socket
    and the rest of the body, to send later."""
    request = raw_multipart_request("/predict", [("file", ("a.jpeg", image))])
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
    body_start = request.index(b"\r\n\r\n") + 4
    half = body_start + (len(request) - body_start) // 2  # the head and half the body
    sock.sendall(request[:half])
    return sock, request[half:]


def _admitted(server: LiveServer) -> float:
    for line in httpx.get(server.url("/metrics"), timeout=10).text.splitlines():
        if line.startswith("pneumoscreen_admitted_images "):
            return float(line.split()[-1])
    return 0.0


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _read_response(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        data = b"".join(chunks)
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if length and len(body) >= length[0]:
                return data


# --- drain ------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, cli=True) as server:
        sock, rest = _partial_predict(server.port, SMALL[0].read_bytes())
        with sock:
            _wait(lambda: _admitted(server) >= 1, "the request to be in flight")
            server.process.send_signal(signal.SIGTERM)
            health = httpx.get(server.url("/health"), timeout=PATIENCE_S)
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "draining"
            assert health.json()["error"]["code"] == "draining"
            assert server.process.poll() is None, "it exited with a request in flight"
            sock.sendall(rest)
            answer = _read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"label"' in answer
        assert server.process.wait(timeout=PATIENCE_S) == 0, server.log()[-3000:]
        assert "draining" in server.log()


def test_drain_timeout_cuts_a_stuck_request_and_still_exits_zero(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, env={"DRAIN_TIMEOUT_S": "1"}, cli=True) as server:
        sock, _ = _partial_predict(server.port, SMALL[0].read_bytes())
        with sock:  # the rest of the body never comes
            _wait(lambda: _admitted(server) >= 1, "the request to be in flight")
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=PATIENCE_S) == 0, server.log()[-3000:]
        assert "drain timeout" in server.log()


# --- hot reload -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    make_tiny_bundle(root / "a", size=64, name="tiny-a", version="1.0.0")
    make_tiny_bundle(root / "b", size=96, name="tiny-b", version="2.0.0", threshold=0.4)
    shutil.copytree(root / "b", root / "broken")
    onnx = root / "broken" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-16] + b"\0" * 16)  # no longer its sha256
    (root / "current").symlink_to(root / "a")
    return {
        "a": root / "a",
        "b": root / "b",
        "broken": root / "broken",
        "current": root / "current",
    }


def _point(bundles: dict[str, Path], name: str) -> None:
    link = bundles["current"]
    tmp = link.with_name("current.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bundles[name])
    tmp.replace(link)  # atomic, as an operator would switch it


@pytest.fixture(scope="module")
def reloadable(bundles: dict[str, Path]) -> Iterator[LiveServer]:
    _point(bundles, "a")
    with live_server(bundles["current"], env={"API_KEY": KEY}, cli=True) as server:
        yield server


def _serving(server: LiveServer) -> dict:
    return httpx.get(server.url("/health"), timeout=PATIENCE_S).json()


def test_admin_reload_under_load_fails_no_request(
    reloadable: LiveServer, bundles: dict[str, Path]
) -> None:
    server = reloadable
    assert _serving(server)["model"]["version"] == "1.0.0"
    stop = threading.Event()
    answers: list[tuple[int, str]] = []
    by_client: dict[int, list[str]] = {}
    image = SMALL[0].read_bytes()

    def client(number: int) -> None:
        seen = by_client.setdefault(number, [])
        with httpx.Client(
            base_url=server.base_url, timeout=PATIENCE_S, headers={"X-API-Key": KEY}
        ) as http:
            while not stop.is_set():
                response = http.post("/predict", files={"file": ("a.jpeg", image)})
                version = response.json().get("model", {}).get("version", "")
                answers.append((response.status_code, version))
                seen.append(version)

    clients = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    for thread in clients:
        thread.start()
    try:
        _wait(lambda: len(answers) >= 20, "traffic before the reload")
        _point(bundles, "b")
        reload = httpx.post(
            server.url("/admin/reload"), headers={"X-API-Key": KEY}, timeout=PATIENCE_S
        )
        served_before = len(answers)
        _wait(lambda: len(answers) >= served_before + 30, "traffic after the reload")
    finally:
        stop.set()
        for thread in clients:
            thread.join(PATIENCE_S)
    assert reload.status_code == 200, reload.text
    report = reload.json()
    assert report["ok"] is True and report["trigger"] == "admin"
    assert report["serving"]["name"] == "tiny-b" and report["serving"]["version"] == "2.0.0"
    assert [a for a in answers if a[0] != 200] == [], "requests failed during the reload"
    versions = [version for _, version in answers]
    assert set(versions) == {"1.0.0", "2.0.0"}
    # Once switched, nothing goes back to the old bundle: a client that was answered by
    # the new one is never answered by the old one again (each client sends one request at
    # a time; the answers of different clients interleave as the machine schedules them).
    assert versions[-10:] == ["2.0.0"] * 10
    for number, seen in by_client.items():
        if "2.0.0" in seen:
            assert "1.0.0" not in seen[seen.index("2.0.0") :], (number, seen)
    health = _serving(server)
    assert health["status"] == "ok" and health["model"]["name"] == "tiny-b"
    assert health["last_reload"]["ok"] is True and health["last_reload"]["trigger"] == "admin"
    card = httpx.get(server.url("/model")).json()
    assert card["version"] == "2.0.0" and card["input"]["height"] == 96
    assert card["threshold"] == 0.4 and card["last_reload"]["serving"]["version"] == "2.0.0"


def test_a_broken_bundle_keeps_the_old_one_serving(
    reloadable: LiveServer, bundles: dict[str, Path]
) -> None:
    server = reloadable
    before = _serving(server)["model"]
    _point(bundles, "broken")
    try:
        response = httpx.post(
            server.url("/admin/reload"), headers={"X-API-Key": KEY}, timeout=PATIENCE_S
        )
    finally:
        _point(bundles, "b")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "reload_failed"
    assert "sha256" in error["message"] and "keeps serving" in error["message"]
    health = _serving(server)
    assert health["status"] == "ok" and health["model"] == before
    assert health["last_reload"]["ok"] is False and "sha256" in health["last_reload"]["error"]
    assert health["last_reload"]["serving"] == before
    predict = httpx.post(
        server.url("/predict"),
        headers={"X-API-Key": KEY},
        files={"file": ("a.jpeg", SMALL[1].read_bytes())},
        timeout=PATIENCE_S,
    )
    assert predict.status_code == 200 and predict.json()["model"]["version"] == before["version"]


def test_sighup_reloads(reloadable: LiveServer, bundles: dict[str, Path]) -> None:
    server = reloadable
    _point(bundles, "a")
    os.kill(server.process.pid, signal.SIGHUP)
    _wait(lambda: _serving(server).get("model", {}).get("version") == "1.0.0", "the SIGHUP reload")
    health = _serving(server)
    assert health["last_reload"]["trigger"] == "sighup" and health["last_reload"]["ok"]
    assert server.process.poll() is None


def test_admin_reload_needs_the_key(reloadable: LiveServer) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = httpx.post(reloadable.url("/admin/reload"), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_admin_reload_is_off_without_a_configured_key(server: LiveServer) -> None:
    response = httpx.post(server.url("/admin/reload"), headers={"X-API-Key": "anything"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"


def test_one_reload_at_a_time(tiny_bundle: Path) -> None:
    app = create_app(Settings(model_dir=tiny_bundle, api_key=KEY, providers="cpu"))
    runner = app.state.runner
    runner.load()
    transport = httpx.ASGITransport(app=app)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/admin/reload", headers={"X-API-Key": KEY})

    try:
        with runner._load_lock:  # a reload already running
            busy = asyncio.run(run())
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "reload_in_progress"
        again = asyncio.run(run())
        assert again.status_code == 200 and again.json()["ok"] is True
    finally:
        runner.close()


def test_a_reload_to_a_format_2_bundle_brings_its_gate(
    tmp_path: Path, tiny_bundle: Path, gated_bundle: Path
) -> None:
    """The gate belongs to the bundle: after reloading from a format 1 bundle to a gated
    one, /health and /model report it, and a non-X-ray is refused by it."""
    from bench.gate_eval import generated_images

    current = tmp_path / "current"
    current.symlink_to(tiny_bundle, target_is_directory=True)
    app = create_app(Settings(model_dir=current, api_key=KEY, providers="cpu"))
    runner = app.state.runner
    runner.load()
    transport = httpx.ASGITransport(app=app)
    _, not_an_xray = next(iter(generated_images()))
    xray = SMALL[0].read_bytes()

    async def predict(client: httpx.AsyncClient, data: bytes, **params: str) -> httpx.Response:
        return await client.post(
            "/predict", files={"file": ("x.jpeg", data)}, params=params, headers={"X-API-Key": KEY}
        )

    async def run() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).json()["gate"] == "unavailable"
            assert (await predict(client, not_an_xray)).status_code == 200  # no gate yet
            current.unlink()
            current.symlink_to(gated_bundle, target_is_directory=True)
            reload = await client.post("/admin/reload", headers={"X-API-Key": KEY})
            assert reload.status_code == 200 and reload.json()["ok"] is True, reload.text
            health = (await client.get("/health")).json()
            assert health["gate"] == "on" and health["heatmaps"] == "available"
            assert (await client.get("/model")).json()["gate"]["status"] == "on"
            refused = await predict(client, not_an_xray)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "not_chest_xray"
            explained = await predict(client, xray, explain="true")
            assert explained.status_code == 200, explained.text
            assert "heatmap" in explained.json()

    try:
        asyncio.run(run())
    finally:
        runner.close()
