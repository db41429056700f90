"""A process-wide budget of decode memory: a semaphore counted in bytes.

Each decode reserves its estimated cost (service.preprocessing estimates it from the
header) before it allocates anything large, and gives it back when it is done. So N
concurrent uploads, each under MAX_DECODED_BYTES, still cannot add up past
DECODE_MEMORY_BUDGET_BYTES, however many decode threads there are.

Waiters are served first come, first served: a large decode is not starved by a stream
of small ones. A wait is bounded (DECODE_BUDGET_WAIT_S); past it the caller gets
`BudgetUnavailable` and the service answers 503 server_busy with Retry-After. A request
larger than the whole budget is clamped to it: it runs alone once everything else is
done (the per-decode limit, MAX_DECODED_BYTES, is what refuses too large an image).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class BudgetUnavailable(RuntimeError):
    """The budget could not be reserved within the wait limit."""

    def __init__(self, nbytes: int, wait_s: float) -> None:
        super().__init__(f"{nbytes:,} bytes of decode memory not available within {wait_s:g} s")
        self.nbytes = nbytes
        self.wait_s = wait_s


class DecodeMemoryBudget:
    """`capacity` bytes shared by all decodes of the process; thread-safe."""

    def __init__(
        self,
        capacity: int,
        wait_s: float,
        on_large_release: Callable[[], object] | None = None,
        large_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.wait_s = wait_s
        self._in_use = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition(threading.Lock())
        # Called (outside the lock) after a reservation of at least `large_bytes` is
        # given back, e.g. to return freed heap memory to the OS (service.allocator).
        self._on_large_release = on_large_release
        self._large_bytes = large_bytes

    @property
    def in_use(self) -> int:
        with self._changed:
            return self._in_use

    def acquire(self, nbytes: int, wait_s: float | None = None) -> int:
        """Reserve `nbytes` (clamped to 0..capacity); return the amount reserved, to be
        given to `release`. Raise BudgetUnavailable after `wait_s` (default: the
        budget's own) without reserving anything."""
        amount = min(max(int(nbytes), 0), self.capacity)
        if amount == 0:
            return 0
        wait = self.wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._in_use + amount <= self.capacity):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BudgetUnavailable(amount, wait)
                    self._changed.wait(remaining)
                self._in_use += amount
            finally:
                self._waiting.remove(ticket)
                # The head of the queue changed (or the budget did): wake the others.
                self._changed.notify_all()
        return amount

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        with self._changed:
            if amount > self._in_use:
                raise RuntimeError("released more decode memory than was reserved")
            self._in_use -= amount
            self._changed.notify_all()
        if self._on_large_release is not None and amount >= self._large_bytes:
            self._on_large_release()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        """`with budget.reserve(cost):` decode, then give the bytes back."""
        amount = self.acquire(nbytes)
        try:
            yield amount
        finally:
            self.release(amount)
