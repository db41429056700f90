"""HTTP/1.1 with budgets: uvicorn's h11 protocol plus the limits uvicorn lacks.

`pneumoscreen serve` (service.server) serves with this protocol. Over uvicorn's own:

- the request head (request line and headers) is capped at MAX_HEADER_BYTES, and the
  header count at MAX_HEADERS: 431 headers_too_large, then the connection closes;
- a connection must deliver a request's headers within HEADER_TIMEOUT_S of opening (or
  of the request's first byte on a kept-alive connection), and its body within
  BODY_TIMEOUT_S of the headers: 408 request_timeout, then it closes. Idle keep-alive
  connections close after KEEP_ALIVE_TIMEOUT_S (uvicorn's timer);
- a connection beyond MAX_CONNECTIONS is answered 503 server_busy and closed at once;
- malformed HTTP is answered 400 invalid_http by the server itself, as JSON.

None of these reach the app: they are answered here, with the API's error shape.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

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


class HardenedH11Protocol(H11Protocol):
    # Set on a subclass by `protocol_class`; None: read from the environment.
    limits: ClassVar[HttpLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http_limits = type(self).limits or _limits_from_environment()
        # Our own head cap, whatever the uvicorn config says (no data has arrived yet).
        self.conn = h11.Connection(h11.SERVER, self.http_limits.max_header_bytes)
        self.app = HeaderCountGuard(self.app, self.http_limits.max_headers)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

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
        super().data_received(data)
        self._follow_state(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow_state(data_arrived=False)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this when h11 refuses the bytes; h11 refuses a head over its cap
        # with an over-long receive buffer.
        buffered, _ = self.conn.trailing_data
        if len(buffered) > self.http_limits.max_header_bytes:
            response = raw_error(
                "headers_too_large",
                f"the request head is larger than {self.http_limits.max_header_bytes:,} bytes",
            )
        else:
            response = raw_error("invalid_http", "malformed HTTP request")
        self.transport.write(response)
        self.transport.close()

    # --- time limits --------------------------------------------------------------------

    def _follow_state(self, data_arrived: bool) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            # Waiting for a head: time it once its first bytes are here (silence between
            # requests is the keep-alive timer's).
            if self._head_timer is None and (data_arrived or self.conn.trailing_data[0]):
                self._arm_head_timer()
        elif state is h11.SEND_BODY:
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
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self._close_with_timeout(
            f"the request headers did not arrive within {self.http_limits.header_timeout_s:g} s"
        )

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        self._close_with_timeout(
            f"the request body did not arrive within {self.http_limits.body_timeout_s:g} s"
        )

    def _close_with_timeout(self, message: str) -> None:
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(raw_error("request_timeout", message))
        if cycle is not None and not cycle.response_complete:
            # The app, if it is reading the body, gets http.disconnect; whatever it sends
            # after this is dropped (the connection is gone).
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_class(limits: HttpLimits) -> type[HardenedH11Protocol]:
    """HardenedH11Protocol bound to `limits` (for uvicorn.Config(http=...))."""
    return type("PneumoscreenH11Protocol", (HardenedH11Protocol,), {"limits": limits})
