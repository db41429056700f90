"""HTTP/1.1 with budgets: uvicorn's httptools protocol plus the limits uvicorn lacks.

`pneumoscreen serve` (service.server) serves with this protocol: uvicorn's HttpToolsProtocol
(the llhttp C parser), and over it:

- the request head (request line and headers) is capped at MAX_HEADER_BYTES, and the
  header count at MAX_HEADERS: 431 headers_too_large, then the connection closes. The
  trailer fields of a chunked body get the same byte cap;
- a connection must deliver a request's headers within HEADER_TIMEOUT_S of opening (or
  of the request's first byte on a kept-alive connection), and its body within
  BODY_TIMEOUT_S of the headers: 408 request_timeout, then it closes. Idle keep-alive
  connections close after KEEP_ALIVE_TIMEOUT_S (uvicorn's timer);
- a connection beyond MAX_CONNECTIONS is answered 503 server_busy and closed at once;
- malformed HTTP is answered 400 invalid_http by the server itself, as JSON.

None of these reach the app: they are answered here, with the API's error shape. When
a pipelined request is refused while an earlier one on the connection is still being
answered, the refusal follows that answer.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.admission import BUSY_RETRY_AFTER_SECONDS
from service.config import Settings
from service.errors import error_body, error_status

log = logging.getLogger("pneumoscreen.http")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


def raw_error(code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole `Connection: close` HTTP/1.1 response with the API's JSON error body."""
    status = error_status(code)
    body = json.dumps(error_body(code, message)).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HeaderCountGuard:
    """ASGI wrapper: more than `max_headers` header fields -> 431, before the app."""

    def __init__(self, app: Any, max_headers: int) -> None:
        self.app = app
        self.max_headers = max_headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(scope["headers"]) > self.max_headers:
            body = json.dumps(
                error_body(
                    "headers_too_large",
                    f"the request has {len(scope['headers'])} header fields; at most "
                    f"{self.max_headers} are accepted",
                )
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": error_status("headers_too_large"),
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


_environment_limits: HttpLimits | None = None


def _limits_from_environment() -> HttpLimits:
    # Worker processes started by uvicorn's supervisor (WORKERS > 1) import this class by
    # name; they read the same environment the app does.
    global _environment_limits
    if _environment_limits is None:
        _environment_limits = HttpLimits.from_settings(Settings())
    return _environment_limits


# Where the parser is in the request stream (set from httptools' callbacks).
_BETWEEN = "between"  # no byte of the next request yet
_HEAD = "head"  # inside a request head
_BODY = "body"  # the head is in, the body is not

# What the connection waits for (the timers follow it).
_WAITING_HEAD = "waiting_head"  # for the next request's head (HEADER_TIMEOUT_S)
_WAITING_BODY = "waiting_body"  # for the body of the request being answered (BODY_TIMEOUT_S)
_ANSWERING = "answering"  # the client waits for a response: no timer runs


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the budgets of this module's docstring. An Upgrade
    offer other than a WebSocket (h2c from `curl --http2`, Java's HttpClient) is ignored
    and the request served as HTTP/1.1, body and all."""

    # Set on a subclass by `protocol_class`; None: read from the environment.
    limits: ClassVar[HttpLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http_limits = type(self).limits or _limits_from_environment()
        self.app = HeaderCountGuard(self.app, self.http_limits.max_headers)
        self._phase = _BETWEEN
        # httptools keeps a header (or trailer) field in memory until it ends, so the bytes
        # of a field section are counted here and never fed past MAX_HEADER_BYTES.
        self._section_bytes = 0
        # After a chunk-size line, until the chunk's data: possibly the trailer section.
        self._after_chunk_header = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered (or about to be) and closing: read nothing more
        self._refusal: bytes | None = None  # sent once the responses owed are complete
        self._upgraded = False  # handed to uvicorn's WebSocket protocol
        # An Upgrade offer this server ignores (anything but a WebSocket, e.g. h2c) on a
        # request with a body: httptools skips that body (see _serve_ignored_upgrade).
        self._skipped_body = False
        self._standing_in = False  # parsing the stand-in head of _serve_ignored_upgrade

    # --- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.http_limits.max_connections:
            self._refused = True
            log.warning(
                "connection refused: %d open, MAX_CONNECTIONS is %d",
                len(self.connections) - 1,
                self.http_limits.max_connections,
            )
            transport.write(
                raw_error(
                    "server_busy",
                    f"too many open connections (the limit is {self.http_limits.max_connections})",
                    {"retry-after": str(BUSY_RETRY_AFTER_SECONDS)},
                )
            )
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        cap = self.http_limits.max_header_bytes
        while self._in_field_section() and self._section_bytes + len(data) > cap:
            # More than the section may hold, unless it ends within what is left of the cap:
            # feed only that much (a section that ends resets the count to 0).
            room = cap - self._section_bytes
            self._section_bytes = cap
            if room:
                self._feed(data[:room])
                if self._refused or self._upgraded or self.transport.is_closing():
                    return
            if self._section_bytes == cap:
                self._refuse_large_section()
                return
            data = data[room:]
        if self._in_field_section():
            self._section_bytes += len(data)
        self._feed(data)
        if not (self._refused or self._upgraded or self.transport.is_closing()):
            self._follow_state(data_arrived=True)

    def _feed(self, data: bytes) -> None:
        # uvicorn's data_received, except that an ignored Upgrade offer loses neither the
        # request's body nor the requests pipelined behind it.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._invalid_http()
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
                self._serve_ignored_upgrade(data[upgrade.args[0] :])

    def _serve_ignored_upgrade(self, rest: bytes) -> None:
        """Go on as plain HTTP/1.1 after an Upgrade offer the server ignores (RFC 9110 7.8).
        httptools skipped the request's body; a fresh parser is put where that body starts
        by a stand-in head with the request's own framing fields."""
        if self._skipped_body:
            self._skipped_body = False
            framing = b"".join(
                b"%s: %s\r\n" % (name, value)
                for name, value in self.headers
                if name in (b"content-length", b"transfer-encoding")
            )
            request = self.url, self.headers, self.scope, self.expect_100_continue
            self.parser = httptools.HttpRequestParser(self)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            self._standing_in = True
            try:
                self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
            except httptools.HttpParserError:  # llhttp took these fields a moment ago
                self._invalid_http()
                return
            finally:
                self._standing_in = False
                self.url, self.headers, self.scope, self.expect_100_continue = request
            self._phase = _BODY
        if rest:
            self.data_received(rest)

    def _invalid_http(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)  # as uvicorn
        self.send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._refusal is not None:
            if not self._response_owed():
                self.transport.write(self._refusal)
                self.transport.close()
            return
        self._follow_state(data_arrived=False)

    def handle_websocket_upgrade(self) -> None:
        # The connection is the WebSocket protocol's from here; it has its own timeouts.
        self._upgraded = True
        self._cancel_timers()
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this when httptools refuses the bytes.
        if self._phase is _BODY:
            self._abort("invalid_http", "malformed HTTP request")
        else:
            self._refuse(raw_error("invalid_http", "malformed HTTP request"))

    # --- parser callbacks (uvicorn's, plus where the parser is) -------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD

    def on_headers_complete(self) -> None:
        if self._standing_in:
            return  # not a request: its cycle is already running
        super().on_headers_complete()  # raises for a head uvicorn refuses: still _HEAD
        self._phase = _BODY
        self._section_bytes = 0
        if self.parser.should_upgrade() and not self._should_upgrade():
            self._skipped_body = self._has_body()

    def _has_body(self) -> bool:
        content_length = b"0"
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return True
            if name == b"content-length":
                content_length = value.strip()
        return not content_length.isdigit() or int(content_length) > 0

    def on_chunk_header(self) -> None:
        self._after_chunk_header = True

    def on_body(self, body: bytes) -> None:
        if self._after_chunk_header:  # a data chunk, not the trailers
            self._after_chunk_header = False
            self._section_bytes = 0
        cycle = self.cycle
        # uvicorn appends each chunk to a bytearray and receive() copies that into bytes:
        # two copies of every upload on the event loop. Held as bytes instead, the first
        # chunk since the app last took the body goes through both as it is (b"" + chunk
        # and bytes(chunk) are the chunk itself); should a second come before the app
        # takes them, they go back into a bytearray (appending to bytes would copy all of
        # it at every chunk).
        if isinstance(cycle.body, bytearray):
            if not cycle.body:
                cycle.body = b""  # type: ignore[assignment]
        elif cycle.body:
            cycle.body = bytearray(cycle.body)
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._after_chunk_header = False
        self._section_bytes = 0

    def on_message_complete(self) -> None:
        if self._skipped_body:
            return  # httptools' end of the head, not of the body
        super().on_message_complete()
        self._phase = _BETWEEN
        self._after_chunk_header = False

    def _in_field_section(self) -> bool:
        """Whether the parser is in (or may be about to read) a head or a trailer section."""
        return self._phase is not _BODY or self._after_chunk_header

    # --- refusals -----------------------------------------------------------------------

    def _response_owed(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _refuse_large_section(self) -> None:
        cap = self.http_limits.max_header_bytes
        log.warning("request refused: a field section over MAX_HEADER_BYTES (%d)", cap)
        if self._phase is _BODY:
            self._abort(
                "headers_too_large", f"the request's trailer fields are larger than {cap:,} bytes"
            )
        else:
            self._refuse(
                raw_error("headers_too_large", f"the request head is larger than {cap:,} bytes")
            )

    def _refuse(self, response: bytes) -> None:
        """Answer a refused request head with `response` and close; after the responses
        still owed to earlier (pipelined) requests, which come first."""
        self._refused = True
        self._cancel_timers()
        if self._response_owed():
            self._refusal = response
            self.flow.pause_reading()
            return
        self.transport.write(response)
        self.transport.close()

    def _abort(self, code: str, message: str) -> None:
        """Answer `code` (unless a response to the request is under way) and close now; the
        request being received, if any, gets http.disconnect and what its app sends after
        this is dropped (the connection is gone)."""
        self._refused = True
        self._cancel_timers()
        cycle = self.cycle
        if self._phase is _BODY:
            # Its app may have answered already, or an earlier pipelined answer is on the wire.
            answer = not self.pipeline and not cycle.response_started
        else:
            answer = not self._response_owed()
        if answer:
            self.transport.write(raw_error(code, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # --- time limits --------------------------------------------------------------------

    def _waiting_for(self) -> str:
        if self._phase is _BODY:
            # A queued (pipelined) request's body is not timed until the answers before it
            # are out (its turn comes after theirs).
            return _ANSWERING if self.pipeline else _WAITING_BODY
        return _ANSWERING if self._response_owed() else _WAITING_HEAD

    def _follow_state(self, data_arrived: bool) -> None:
        state = self._waiting_for()
        if state is _WAITING_HEAD:
            # Waiting for a head: time it once its first bytes are here (silence between
            # requests is the keep-alive timer's).
            if self._head_timer is None and (
                data_arrived or self._phase is _HEAD or self._section_bytes > 0
            ):
                self._arm_head_timer()
        elif state is _WAITING_BODY:
            self._cancel_head_timer()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(
                    self.http_limits.body_timeout_s, self._on_body_timeout
                )
        else:
            self._cancel_timers()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(
            self.http_limits.header_timeout_s, self._on_head_timeout
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._waiting_for() is not _WAITING_HEAD:
            return
        self._abort(
            "request_timeout",
            f"the request headers did not arrive within {self.http_limits.header_timeout_s:g} s",
        )

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._waiting_for() is not _WAITING_BODY:
            return
        self._abort(
            "request_timeout",
            f"the request body did not arrive within {self.http_limits.body_timeout_s:g} s",
        )


def protocol_class(limits: HttpLimits) -> type[HardenedHttpToolsProtocol]:
    """HardenedHttpToolsProtocol bound to `limits` (for uvicorn.Config(http=...))."""
    return type("PneumoscreenHttpToolsProtocol", (HardenedHttpToolsProtocol,), {"limits": limits})
