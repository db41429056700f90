"""The serving engine over real HTTP: admission (503 server_busy), the per-request deadline
(504), work dropped when the client disconnects, and batches merged across requests.

The bundle is the tiny test graph with a side chain of matrix products (bundle_factory's
`slow_matmuls`): every model call costs real compute, so with MAX_BATCH_SIZE=1 a batch
request keeps the model busy for many calls and a queue builds up for real. Nothing here
asserts a duration; the tests wait on the server's own metrics instead.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.bundle_factory import make_tiny_bundle
from tests.support.live_server import LiveServer, live_server, raw_multipart_request
from tests.support.xray_samples import SMALL, reference_probabilities

SLOW_MATMULS = 32
BATCH = 32  # files in the batch that keeps the model busy (MAX_BATCH_FILES' default)


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("slow-bundle")
    make_tiny_bundle(directory, size=64, slow_matmuls=SLOW_MATMULS)
    return directory


@pytest.fixture(scope="module")
def one_at_a_time(slow_bundle: Path) -> Iterator[LiveServer]:
    """One image per model call, at most BATCH images admitted."""
    env = {"MAX_BATCH_SIZE": "1", "MAX_QUEUE": str(BATCH), "INTRA_OP_THREADS": "1"}
    with live_server(slow_bundle, env=env) as server:
        yield server


def metric(server: LiveServer, name: str, labels: str = "") -> float:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    pattern = (
        rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
        if labels
        else rf"^{re.escape(name)}(?:\{{\}})? ([0-9.e+-]+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def runs(server: LiveServer) -> float:
    return metric(server, "pneumoscreen_inference_duration_seconds_count")


def _batch_files(count: int) -> list[tuple[str, tuple[str, bytes]]]:
    data = SMALL[0].read_bytes()
    return [("files", (f"{i}.jpeg", data)) for i in range(count)]


def _raw_multipart(count: int) -> bytes:
    """A whole POST /predict/batch request with `count` files, as bytes."""
    return raw_multipart_request("/predict/batch", _batch_files(count))


def test_full_queue_answers_503_server_busy_at_once(one_at_a_time: LiveServer) -> None:
    server = one_at_a_time
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            httpx.post, server.url("/predict/batch"), files=_batch_files(BATCH), timeout=300
        )
        wait_for(
            lambda: metric(server, "pneumoscreen_admitted_images") >= BATCH,
            "the batch to be admitted",
        )
        refused = httpx.post(
            server.url("/predict"), files={"file": ("a.jpeg", SMALL[1].read_bytes())}, timeout=30
        )
        # The model is still on the big batch: the refusal did not wait for it.
        still_running = not busy.done()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "server_busy"
        assert refused.headers["retry-after"] == "1"
        assert still_running
        assert busy.result().status_code == 200
    # Room again: served as usual.
    ok = httpx.post(
        server.url("/predict"), files={"file": ("a.jpeg", SMALL[1].read_bytes())}, timeout=60
    )
    assert ok.status_code == 200, ok.text
    assert metric(server, "pneumoscreen_admitted_images") == 0


def test_disconnected_client_work_is_dropped_not_run(one_at_a_time: LiveServer) -> None:
    server = one_at_a_time
    wait_for(lambda: metric(server, "pneumoscreen_admitted_images") == 0, "an idle server")
    runs_before = runs(server)
    dropped_before = metric(server, "pneumoscreen_dropped_images_total", '{reason="cancelled"}')
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(_raw_multipart(BATCH))
        wait_for(lambda: runs(server) > runs_before, "the model to start on the batch")
    # The socket is closed: the server must drop the rest rather than run it.
    wait_for(
        lambda: (
            metric(server, "pneumoscreen_admitted_images") == 0
            and metric(server, "pneumoscreen_queued_images") == 0
        ),
        "the server to let go",
    )
    ran = runs(server) - runs_before
    dropped = (
        metric(server, "pneumoscreen_dropped_images_total", '{reason="cancelled"}') - dropped_before
    )
    assert ran < BATCH, f"all {BATCH} images ran for a client that had gone"
    assert dropped >= 1 and ran + dropped <= BATCH
    assert 'status="499"' in httpx.get(server.url("/metrics")).text
    assert httpx.get(server.url("/health")).status_code == 200


def test_deadline_answers_504_and_drops_the_rest(slow_bundle: Path) -> None:
    env = {"MAX_BATCH_SIZE": "1", "REQUEST_TIMEOUT_S": "0.5", "INTRA_OP_THREADS": "1"}
    with live_server(slow_bundle, env=env) as server:
        response = httpx.post(server.url("/predict/batch"), files=_batch_files(BATCH), timeout=300)
        assert response.status_code == 504, response.text
        body = response.json()
        assert body["error"]["code"] == "deadline_exceeded"
        assert "0.5 s" in body["error"]["message"]
        wait_for(lambda: metric(server, "pneumoscreen_queued_images") == 0, "the queue")
        ran = runs(server) - 1  # the warm-up
        dropped = sum(
            metric(server, "pneumoscreen_dropped_images_total", f'{{reason="{r}"}}')
            for r in ("cancelled", "deadline")
        )
        assert ran < BATCH and dropped >= 1
        # A request that fits in its deadline is unaffected.
        one = httpx.post(
            server.url("/predict"), files={"file": ("a.jpeg", SMALL[0].read_bytes())}, timeout=60
        )
        assert one.status_code == 200, one.text


def test_concurrent_requests_share_batches_and_get_unbatched_answers(
    slow_bundle: Path,
) -> None:
    with live_server(slow_bundle, env={"MAX_BATCH_SIZE": "16", "INTRA_OP_THREADS": "1"}) as server:
        samples = [SMALL[i % len(SMALL)] for i in range(16)]

        def call(path: Path) -> dict:
            response = httpx.post(
                server.url("/predict"), files={"file": (path.name, path.read_bytes())}, timeout=120
            )
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, samples))
        for path, answer in zip(samples, answers, strict=True):
            expected = reference_probabilities(slow_bundle, path.read_bytes())
            assert answer["probabilities"] == pytest.approx(expected, abs=1e-6)
        same_image = [
            a["probabilities"] for p, a in zip(samples, answers, strict=True) if p == samples[0]
        ]
        assert all(probabilities == same_image[0] for probabilities in same_image)
        # Fewer model calls than requests: the scheduler merged them.
        assert runs(server) - 1 < len(samples)
