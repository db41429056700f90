"""A request's work, bounded: by its deadline (REQUEST_TIMEOUT_S) and by its client.

Starlette keeps running a handler after its client has gone; `bounded` does not. It runs the
work (decoding, then the model) as a task and waits for the first of: the work finishing,
the deadline (-> 504 deadline_exceeded), or the client disconnecting (-> 499
client_disconnected, which nobody receives but the log and metrics count). In both of the
last cases the task is cancelled, which cancels queued decodes and drops the request's
images from the model queue (service.scheduler) before they run.

The disconnect is seen on the ASGI receive channel: once the body has been read, the next
message the server sends is `http.disconnect`, when the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from service import deps
from service.errors import ApiError, deadline_message

T = TypeVar("T")


class ClientDisconnected(ApiError):
    def __init__(self) -> None:
        super().__init__(
            "client_disconnected",
            "the client disconnected before the answer; its queued work was dropped",
        )


def deadline_from_now(request: Request) -> float:
    """time.monotonic() value REQUEST_TIMEOUT_S from now (call it once the body is in)."""
    return time.monotonic() + deps.settings(request).request_timeout_s


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def bounded(request: Request, work: Awaitable[T], deadline: float | None = None) -> T:
    """The result of `work`, unless the deadline (default: `request.state.deadline`)
    passes or the client goes first."""
    if deadline is None:
        deadline = request.state.deadline
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher: asyncio.Future[None] = asyncio.ensure_future(_disconnected(request))
    racing: set[asyncio.Future[Any]] = {task, watcher}
    try:
        done, _ = await asyncio.wait(
            racing,
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            return task.result()
        if watcher in done:
            raise ClientDisconnected()
        raise ApiError("deadline_exceeded", deadline_message(request))
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        # Let the cancelled work unwind (its queued images are dropped) before answering.
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(BaseException):
            await watcher
