"""Process signals the app itself acts on: draining (SIGTERM, via the server) and SIGHUP.

`Lifecycle` is the app's shutdown state. `pneumoscreen serve` (service.server) calls
`begin_drain()` on SIGTERM; from then on /health answers 503 `draining`, so a load balancer
stops sending, while the requests in flight finish.

SIGHUP reloads the model bundle (ModelRunner.start_reload) without stopping: the app
installs that handler itself at start-up, so it works under `pneumoscreen serve` and under
plain uvicorn alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

log = logging.getLogger("pneumoscreen")


class Lifecycle:
    def __init__(self) -> None:
        self.draining_since: float | None = None  # time.monotonic()

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_drain(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()


def install_reload_signal(
    loop: asyncio.AbstractEventLoop, reload: Callable[[], object]
) -> Callable[[], None]:
    """Call `reload` on SIGHUP; returns the function that removes the handler. A no-op
    where signals cannot be handled (not the main thread, no SIGHUP on the platform)."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None:
        return lambda: None

    def on_hup() -> None:
        log.info("SIGHUP: reloading the model bundle")
        reload()

    try:
        loop.add_signal_handler(hup, on_hup)
    except (NotImplementedError, RuntimeError, ValueError):
        return lambda: None

    def remove() -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(hup)

    return remove
