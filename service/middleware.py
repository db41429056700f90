"""Per-request plumbing as one pure ASGI middleware (it does not buffer bodies):

- rejects bodies over MAX_REQUEST_BYTES, on Content-Length before reading and while the
  body streams in (chunked uploads have no Content-Length);
- counts requests and latency per route template for /metrics;
- logs one JSON line per request: method, route, status, ms, n_files. Never file
  contents, filenames or anything from a DICOM header;
- adds the Server-Timing header of a request that recorded its stages (service.timing).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.docs import STATIC_PREFIX
from service.errors import ApiError, error_body, error_status
from service.metrics import Metrics
from service.timing import HEADER, recorded

access_log = logging.getLogger("pneumoscreen.access")


class RequestTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            "request_too_large",
            f"the request body is larger than the limit of {limit:,} bytes",
        )


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_request_bytes: int,
        known_paths: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        # Paths of the app's routes, to label requests rejected before routing.
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = {"code": 500}
        limit = self.max_request_bytes

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                times = recorded(state)
                if times is not None:
                    app_ms = (time.perf_counter() - started) * 1000.0
                    headers = [*message.get("headers", ()), (HEADER, times.header(app_ms))]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                message = (
                    f"the request body ({declared:,} bytes) is larger than the limit "
                    f"of {limit:,} bytes"
                )
                body: dict[str, Any] = error_body("request_too_large", message)
                if scope.get("path", "").startswith("/v2/"):
                    body = {"error": message}  # the Open Inference Protocol's error shape
                await _send_json(send_wrapper, error_status("request_too_large"), body)
                return
            received = 0

            async def receive_wrapper() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise RequestTooLarge(limit)
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope, self.known_paths)
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            if route not in ("/livez", "/metrics"):
                access_log.info(
                    json.dumps(
                        {
                            "method": method,
                            "route": route,
                            "status": status["code"],
                            "ms": round(elapsed * 1000, 1),
                            "n_files": state.get("n_files", 0),
                        }
                    )
                )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route_template(scope: Scope, known_paths: frozenset[str] | set[str]) -> str:
    # The matched route's template, never the raw path: unknown paths must not create
    # one time series each.
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Plain (non-API) routes such as /openapi.json, /docs and the static files.
    raw: str = scope.get("path", "")
    if raw in _PLAIN_ROUTES or raw in known_paths:
        return raw
    if raw.startswith(STATIC_PREFIX + "/"):
        return STATIC_PREFIX
    return "unmatched"


_PLAIN_ROUTES = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
