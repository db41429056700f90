"""Admission control: a bound on the images the service holds at once (MAX_QUEUE).

A request is admitted, before its body is read, when fewer than `max_images` images are in
the service (being read, decoded, waiting for the model or in it); otherwise it is refused
at once with 503 server_busy and Retry-After (service/errors.py), so an overloaded server
answers in milliseconds instead of queueing without end. Once its form is parsed, a batch
request counts each of its files. So at most MAX_QUEUE + MAX_BATCH_FILES - 1 images are
ever held, and a client that is refused can try again, here or elsewhere.

All of this runs on the event loop thread, so the counter needs no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Self

# What Retry-After says to a client that was refused (seconds).
BUSY_RETRY_AFTER_SECONDS = 1


class ServerBusy(RuntimeError):
    """MAX_QUEUE images are already admitted: 503 server_busy (service/errors.py)."""


class Ticket:
    """The images one admitted request holds; released when the `with` block ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.images = 1

    def grow(self, images: int) -> None:
        """Count `images` for this request (its file count, known once the form is
        parsed); never refused, the request is already in."""
        extra = max(images, 1) - self.images
        if extra > 0:
            self.images += extra
            self._admission._add(extra)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._admission._add(-self.images)
        self.images = 0


class Admission:
    def __init__(self, max_images: int, on_change: Callable[[int], None] | None = None) -> None:
        self.max_images = max_images
        self.in_flight = 0
        self._on_change = on_change

    def enter(self) -> Ticket:
        """Admit one request (counting one image until it says more), or ServerBusy."""
        if self.in_flight >= self.max_images:
            raise ServerBusy(
                f"the server is busy ({self.in_flight} images in progress, the limit is "
                f"{self.max_images}); retry in {BUSY_RETRY_AFTER_SECONDS} s"
            )
        self._add(1)
        return Ticket(self)

    def _add(self, images: int) -> None:
        self.in_flight += images
        if self._on_change is not None:
            self._on_change(self.in_flight)
