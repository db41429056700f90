"""service.decode_budget.DecodeMemoryBudget: a byte-weighted semaphore for decode threads.

Every wait here is bounded (at most a few seconds, on a loaded machine); no assertion is
about speed, only about order and amounts.
"""

from __future__ import annotations

import threading
import time

import pytest

from service.decode_budget import BudgetUnavailable, DecodeMemoryBudget

LONG = 10.0  # a wait that only ends early when the budget works


def test_reserve_and_release_amounts() -> None:
    budget = DecodeMemoryBudget(100, wait_s=0)
    with budget.reserve(60) as held:
        assert held == 60 and budget.in_use == 60
        with budget.reserve(40):
            assert budget.in_use == 100
        assert budget.in_use == 60
    assert budget.in_use == 0
    # More than the whole budget is clamped: it runs alone rather than never.
    with budget.reserve(10_000) as held:
        assert held == 100
    assert budget.acquire(0) == 0 and budget.acquire(-5) == 0
    with pytest.raises(RuntimeError):
        budget.release(1)
    with pytest.raises(ValueError):
        DecodeMemoryBudget(0, wait_s=1)


def test_a_full_budget_times_out_without_reserving() -> None:
    budget = DecodeMemoryBudget(100, wait_s=0.05)
    budget.acquire(80)
    with pytest.raises(BudgetUnavailable) as raised:
        budget.acquire(30)
    assert raised.value.nbytes == 30 and budget.in_use == 80
    assert budget.acquire(20) == 20  # what fits is still granted
    budget.release(100)
    assert budget.in_use == 0


def test_a_waiter_gets_the_budget_when_another_thread_releases_it() -> None:
    budget = DecodeMemoryBudget(100, wait_s=LONG)
    budget.acquire(100)
    got = threading.Event()

    def waiter() -> None:
        budget.acquire(50)
        got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not got.wait(0.2), "must wait while the budget is taken"
    budget.release(100)
    assert got.wait(LONG), "released budget reaches the waiter"
    thread.join(LONG)
    assert budget.in_use == 50


def test_waiters_are_served_first_come_first_served() -> None:
    """A large request is not starved by small ones that arrive after it."""
    budget = DecodeMemoryBudget(100, wait_s=LONG)
    budget.acquire(60)
    order: list[str] = []

    def take(name: str, amount: int) -> None:
        budget.acquire(amount)
        order.append(name)

    large = threading.Thread(target=take, args=("large", 100))
    large.start()
    deadline = time.monotonic() + LONG
    while not budget._waiting and time.monotonic() < deadline:  # the large one is queued
        time.sleep(0.01)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but is second
    small.start()
    time.sleep(0.2)
    assert order == [], "the small request waits behind the large one"
    budget.release(60)
    large.join(LONG)
    assert order == ["large"]
    budget.release(100)
    small.join(LONG)
    assert order == ["large", "small"]


def test_concurrent_threads_never_exceed_the_capacity() -> None:
    budget = DecodeMemoryBudget(1000, wait_s=LONG)
    seen_max = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(200):
                with budget.reserve(50 + (seed * 37 + i * 11) % 400), lock:
                    seen_max[0] = max(seen_max[0], budget.in_use)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert budget.in_use == 0
    assert 0 < seen_max[0] <= 1000


def test_a_large_release_calls_the_hook() -> None:
    calls: list[int] = []
    budget = DecodeMemoryBudget(
        100, wait_s=0, on_large_release=lambda: calls.append(1), large_bytes=50
    )
    with budget.reserve(10):
        pass
    assert calls == []
    with budget.reserve(50):
        pass
    assert calls == [1]
