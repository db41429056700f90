"""HTTP budgets of `pneumoscreen serve` (service/http_protocol.py), over raw sockets.

Each test plays an attacker: a 100 MB header, too many header fields, headers or a body sent
one byte at a time, connections left open doing nothing, more connections than allowed.
The server must refuse or close them itself, answer with the API's JSON error shape where
it answers at all, and keep serving everyone else. Honest clients (pipelined requests,
heads in small packets, an h2c upgrade offer) must be served. Timeouts are set short in the
server's environment; the tests only bound how long they wait for the server to act
(generously, for a loaded machine), they assert no speed.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import LiveServer, live_server, raw_multipart_request

FULLRES = Path(__file__).resolve().parents[1] / "fixtures" / "fullres"

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


# --- the stream itself: pipelining, split heads, the cap on one read, trailers -------------


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each whole Content-Length response in `data`, in order."""
    responses = []
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            return responses
        head = data[:head_end]
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length, head
        end = head_end + 4 + int(length.group(1))
        if len(data) < end:
            return responses
        responses.append((int(head.split(b" ", 2)[1]), data[head_end + 4 : end]))
        data = data[end:]


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    data = b""
    while len(responses := parse_responses(data)) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed after {len(responses)} of {count} responses: {data!r}"
        data += chunk
    return responses


def padded_head(size: int, extra: bytes = b"") -> bytes:
    """A whole `GET /livez` head of exactly `size` bytes (padded with one X-Pad field)."""
    start = b"GET /livez HTTP/1.1\r\nHost: x\r\n" + extra + b"X-Pad: "
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    return head


def test_pipelined_requests_are_answered_in_order(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        sock.sendall(
            b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        responses = read_responses(sock, 4)
        assert [status for status, _ in responses] == [200, 405, 200, 200]
        assert responses[0][1] == responses[3][1] == b'{"status":"alive"}'
        assert json.loads(responses[2][1])["status"] == "ok"
        # The connection is still in step for the next request.
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1) == [(200, b'{"status":"alive"}')]


def test_pipelined_uploads_each_get_their_own_body(hardened: LiveServer) -> None:
    """Three 540 KB uploads in one send: the second and third bodies arrive, in several
    reads each, while the first is served (service.http_protocol keeps a body chunk as the
    bytes it came in, and joins later chunks): each answer is that of the image sent
    alone."""
    xray = FULLRES / "NORMAL_NORMAL2-IM-0967-0001.jpeg"
    small = FULLRES / "PNEUMONIA_person466_bacteria_1984.jpeg"

    def predict(path: Path) -> bytes:
        return raw_multipart_request("/predict", [("file", (path.name, path.read_bytes()))])

    def scores(body: bytes) -> dict:
        return json.loads(body)["probabilities"]

    alone = {}
    for path in (xray, small):
        with connect(hardened) as sock:
            sock.sendall(predict(path))
            [(status, body)] = read_responses(sock, 1)
            assert status == 200, body
            alone[path] = scores(body)
    with connect(hardened) as sock:
        sock.sendall(predict(xray) + predict(small) + predict(xray))
        responses = read_responses(sock, 3)
    assert [status for status, _ in responses] == [200, 200, 200], responses
    assert [scores(body) for _, body in responses] == [alone[xray], alone[small], alone[xray]]


def test_a_head_under_the_cap_in_many_small_packets_is_served(hardened: LiveServer) -> None:
    head = padded_head(8000)  # MAX_HEADER_BYTES is 8192, counted over all the packets
    with connect(hardened) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(head), 200):  # 40 packets, well within HEADER_TIMEOUT_S
            sock.sendall(head[start : start + 200])
            time.sleep(0.002)
        assert read_responses(sock, 1) == [(200, b'{"status":"alive"}')]


def test_a_head_over_the_cap_is_431_however_it_arrives(hardened: LiveServer) -> None:
    head = padded_head(8193)
    for packet in (len(head), 500):  # all in one send; in small packets
        with connect(hardened) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(head), packet):
                sock.sendall(head[start : start + packet])
            assert error_of(read_until_closed(sock)) == (431, "headers_too_large")


def test_a_head_near_the_cap_with_a_large_body_in_one_send(hardened: LiveServer) -> None:
    body = b"b" * 200_000
    head = padded_head(8100, extra=b"Content-Length: %d\r\n" % len(body))
    with connect(hardened) as sock:
        sock.sendall(head + body + b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 2) == [(200, b'{"status":"alive"}')] * 2


def test_a_slow_head_on_a_kept_alive_connection_is_408(hardened: LiveServer) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(sock, 1) == [(200, b'{"status":"alive"}')]
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answer = read_until_closed(sock)
    assert error_of(answer) == (408, "request_timeout")


def test_malformed_request_pipelined_after_a_good_one_is_answered_after_it(
    hardened: LiveServer,
) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE \x00\x01 nonsense\r\n\r\n")
        responses = parse_responses(read_until_closed(sock))
    assert responses[0] == (200, b'{"status":"alive"}')
    assert [(status, json.loads(body)["error"]["code"]) for status, body in responses[1:]] == [
        (400, "invalid_http")
    ]


def test_100_mb_of_trailer_fields_are_refused(hardened: LiveServer) -> None:
    sent = 0
    closed = False
    with connect(hardened) as sock:
        try:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\n--b\r\n\r\n0\r\nX-Big: "
            )
            chunk = b"a" * (1 << 20)
            for _ in range(100):  # 100 MB of one trailer field, never finished
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server closed on us: what we want
            closed = True
        try:
            answer = read_until_closed(sock)
        except OSError:
            answer = b""
    assert closed, "the server read all 100 MB of a trailer field"
    assert sent < 100 * (1 << 20)
    if answer:  # the 431 may be lost to the reset
        assert error_of(answer) == (431, "headers_too_large")
    assert httpx.get(hardened.url("/health"), timeout=PATIENCE_S).status_code == 200


XRAY = Path(__file__).resolve().parents[1] / "fixtures/chest_xray/train/NORMAL/IM-0115-0001.jpeg"
H2C_OFFER = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_ignored_h2c_upgrade_offer_is_served_as_http_1_1(
    hardened: LiveServer, framing: str
) -> None:
    # What `curl --http2` and Java's RestClient send over http://: the server ignores the
    # offer (RFC 9110 7.8) and must still read the body, and what is pipelined behind it.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + XRAY.read_bytes() + b"\r\n--b--\r\n"
    )
    if framing == "chunked":
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        length_field = b"Transfer-Encoding: chunked\r\n"
    else:
        wire, length_field = body, b"Content-Length: %d\r\n" % len(body)
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\n" + H2C_OFFER + length_field + b"Content-Type: "
        b"multipart/form-data; boundary=b\r\n\r\n"
    )
    with connect(hardened) as sock:
        sock.sendall(head + wire + b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        (status, answer), livez = read_responses(sock, 2)
        assert status == 200, answer
        assert json.loads(answer)["label"] in {"NORMAL", "PNEUMONIA"}
        assert livez == (200, b'{"status":"alive"}')
        # The body in its own packets after the head, as Ktor writes it.
        sock.sendall(head)
        time.sleep(0.05)
        sock.sendall(wire)
        ((status, answer),) = read_responses(sock, 1)
        assert status == 200, answer
