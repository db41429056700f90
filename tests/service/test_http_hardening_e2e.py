"""HTTP budgets of `pneumoscreen serve` (service/http_protocol.py), over raw sockets.

Each test plays an attacker: a 100 MB header, too many header fields, headers or a body sent
one byte at a time, connections left open doing nothing, more connections than allowed.
The server must refuse or close them itself, answer with the API's JSON error shape where
it answers at all, and keep serving everyone else. Timeouts are set short in the server's
environment; the tests only bound how long they wait for the server to act (generously,
for a loaded machine), they assert no speed.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
# How long a test waits for the server to close a connection (timeout + a loaded machine).
PATIENCE_S = 20.0


@pytest.fixture(scope="module")
def hardened(tiny_bundle: Path) -> Iterator[LiveServer]:
    env = {
        "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "MAX_HEADERS": "50",
        "MAX_HEADER_BYTES": "8192",
        "KEEP_ALIVE_TIMEOUT_S": "1",
    }
    with live_server(tiny_bundle, env=env, cli=True) as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE_S)
    sock.settimeout(PATIENCE_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as
    closed); fails the test if it keeps the connection open past PATIENCE_S."""
    chunks = []
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {PATIENCE_S} s"
            ) from None
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def error_of(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]["code"]


def test_a_100_mb_header_is_refused_while_livez_answers(hardened: LiveServer) -> None:
    sent = 0
    outcome: dict[str, object] = {}

    def attack() -> None:
        nonlocal sent
        sock = connect(hardened)
        try:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
            chunk = b"a" * (1 << 20)
            for _ in range(100):  # 100 MB, never finished with \r\n\r\n
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError as exc:  # the server closed on us: what we want
            outcome["closed"] = type(exc).__name__
        try:
            outcome["answer"] = read_until_closed(sock)
        except OSError:
            outcome["answer"] = b""
        sock.close()

    attacker = threading.Thread(target=attack)
    attacker.start()
    for _ in range(5):
        assert httpx.get(hardened.url("/livez"), timeout=PATIENCE_S).status_code == 200
    attacker.join(120)
    assert not attacker.is_alive()
    assert "closed" in outcome, "the server read all 100 MB of a header"
    assert sent < 100 * (1 << 20)
    answer = outcome["answer"]
    if answer:  # the 431 may be lost to the reset; when it arrives it is the API's shape
        assert error_of(answer) == (431, "headers_too_large")
    assert httpx.get(hardened.url("/health"), timeout=PATIENCE_S).status_code == 200


def test_too_many_header_fields_are_431_before_the_app(hardened: LiveServer) -> None:
    headers = {f"x-h{i}": "1" for i in range(60)}
    response = httpx.get(hardened.url("/livez"), headers=headers, timeout=PATIENCE_S)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    # The app never saw it: no request was counted for /livez with status 431.
    assert 'status="431"' not in httpx.get(hardened.url("/metrics")).text


def test_malformed_http_is_answered_by_the_server_as_json(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
        status, code = error_of(read_until_closed(sock))
    assert (status, code) == (400, "invalid_http")


def test_slow_loris_headers_are_cut_off(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = b""
        try:
            # One byte every 0.2 s, far slower than HEADER_TIMEOUT_S allows for the head.
            for byte in b"X-Slow: " + b"a" * 200:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > PATIENCE_S:
                    break
        except OSError:
            pass
        answer = read_until_closed(sock)
    assert time.monotonic() - started < PATIENCE_S, "the slow head was never cut off"
    if answer:
        assert error_of(answer) == (408, "request_timeout")


def test_idle_connection_is_closed(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        answer = read_until_closed(sock)  # sends nothing at all
    assert error_of(answer) == (408, "request_timeout")


def test_slow_body_is_cut_off_with_408(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        started = time.monotonic()
        try:
            while time.monotonic() - started < PATIENCE_S:
                sock.sendall(b"a")
                time.sleep(0.2)
        except OSError:
            pass
        answer = read_until_closed(sock)
    assert time.monotonic() - started < PATIENCE_S, "the slow body was never cut off"
    if answer:
        assert error_of(answer) == (408, "request_timeout")
    assert httpx.get(hardened.url("/health"), timeout=PATIENCE_S).status_code == 200


def test_keep_alive_connection_serves_then_closes_when_idle(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        for _ in range(2):
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"alive"}'):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
        assert read_until_closed(sock) == b""  # closed after KEEP_ALIVE_TIMEOUT_S, silently


def test_connections_beyond_the_cap_are_refused(tiny_bundle: Path) -> None:
    with live_server(
        tiny_bundle, env={"MAX_CONNECTIONS": "4", "HEADER_TIMEOUT_S": "60"}, cli=True
    ) as server:
        held = [connect(server) for _ in range(4)]
        try:
            # The 4 are open (and idle); a 5th is answered 503 and closed at once.
            with connect(server) as extra:
                status, code = error_of(read_until_closed(extra))
            assert (status, code) == (503, "server_busy")
        finally:
            for sock in held:
                sock.close()
        # Room again once they are gone.
        deadline = time.monotonic() + PATIENCE_S
        while True:
            try:
                if httpx.get(server.url("/livez"), timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never took connections again"
            time.sleep(0.1)
