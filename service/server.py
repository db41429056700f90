"""`pneumoscreen serve`: uvicorn with the HTTP budgets of service.http_protocol, and a
graceful drain.

Drain: on SIGTERM (or Ctrl+C) the app's /health turns 503 `draining` at once, so a load
balancer stops sending, while the listener stays open and the requests in flight finish.
When none is left, or DRAIN_TIMEOUT_S after the signal, uvicorn shuts down (what still runs
then is cancelled) and the process exits with code 0. A second signal stops at once.

With WORKERS > 1 uvicorn's own supervisor runs the workers: each gets the same HTTP
budgets, and uvicorn's shutdown (bounded by DRAIN_TIMEOUT_S) instead of the drain above;
run one worker per container to get it.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.http_protocol import HttpLimits, protocol_class
from service.lifecycle import Lifecycle

log = logging.getLogger("pneumoscreen")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every `pneumoscreen serve` passes to uvicorn, from the settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "proxy_headers": True,
        "access_log": False,  # the app logs each request itself, without file contents
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": max(1, round(settings.drain_timeout_s)),
    }


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM/SIGINT, then exits cleanly (code 0)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after shutting down, so the process would die by it
        # (exit code 143); a drained shutdown is a normal exit, so it is not recorded.
        if self.lifecycle.draining or self.should_exit:
            log.warning("second %s: stopping now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self.lifecycle.begin_drain()
        log.info(
            "%s: draining (/health answers 503); %d request(s) in flight, up to %g s",
            signal.Signals(sig).name,
            len(self.server_state.tasks),
            self.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        since = self.lifecycle.draining_since
        if since is None:
            return False
        if not self.server_state.tasks:
            log.info("drained: no request in flight")
            return True
        if time.monotonic() - since >= self.drain_timeout_s:
            log.warning(
                "drain timeout (%g s): %d request(s) still in flight are cancelled",
                self.drain_timeout_s,
                len(self.server_state.tasks),
            )
            return True
        return False

    async def shutdown(self, sockets: Any = None) -> None:
        since = self.lifecycle.draining_since
        if since is not None:
            # What is left of the drain budget; uvicorn then cancels what still runs.
            left = self.drain_timeout_s - (time.monotonic() - since)
            self.config.timeout_graceful_shutdown = max(0.5, left)  # type: ignore[assignment]
        await super().shutdown(sockets=sockets)


def serve(settings: Settings) -> None:
    """Run the API until SIGTERM/SIGINT; drains first (see module docstring)."""
    limits = HttpLimits.from_settings(settings)
    options = uvicorn_options(settings)
    if settings.workers > 1:
        uvicorn.run(
            "service.main:create_app",
            factory=True,
            workers=settings.workers,
            http="service.http_protocol:HardenedHttpToolsProtocol",
            **options,
        )
        return
    from service.main import create_app

    app: FastAPI = create_app(settings)
    config = uvicorn.Config(app, http=protocol_class(limits), **options)
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s)
    server.run()
    if not server.started:
        raise SystemExit(1)  # the port was taken or the app failed to start: uvicorn logged why
