"""service.collector: after a load, what survives is frozen; the next load unfreezes it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import collector
from service.config import Settings
from service.inference import ModelRunner


class Node:
    """A container object that can be in a reference cycle and be weakly referenced."""

    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> weakref.ref[Node]:
    """A two-node reference cycle nobody holds: only the cyclic collector frees it."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_collects_garbage_then_freezes_the_survivors() -> None:
    garbage = _cycle()
    kept = Node()
    frozen = collector.settle()
    assert garbage() is None
    assert frozen == gc.get_freeze_count() > 0
    # The survivors are out of every generation: a full collection no longer walks them.
    assert not any(obj is kept for obj in gc.get_objects())
    # What is created afterwards is collected as before.
    later = _cycle()
    gc.collect()
    assert later() is None


def test_the_next_settle_collects_what_the_last_one_froze() -> None:
    """A hot reload: the previous model's objects were frozen while it served; once they
    are garbage, the next load's settle frees them."""
    holder = Node()
    holder.other = Node()  # alive at the first settle, so frozen
    dropped = weakref.ref(holder.other)
    holder.other.other = holder.other  # a cycle of its own
    collector.settle()
    holder.other = None
    gc.collect()
    assert dropped() is not None  # frozen: collections skip it
    collector.settle()
    assert dropped() is None


def test_every_load_settles(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up load, a reload, and a load that failed (it leaves garbage too)."""
    calls: list[int] = []
    real = collector.settle

    def counted() -> int:
        calls.append(real())
        return calls[-1]

    monkeypatch.setattr(collector, "settle", counted)
    runner = ModelRunner(Settings(model_dir=tiny_bundle, providers="cpu"))
    try:
        runner.load()
        assert runner.ready and len(calls) == 1 and calls[0] > 0
        assert runner.reload("admin").ok
        assert len(calls) == 2
    finally:
        runner.close()
    broken = ModelRunner(Settings(model_dir=tmp_path, providers="cpu"))  # no bundle there
    try:
        broken.load()
        assert broken.state == "failed" and len(calls) == 3
    finally:
        broken.close()
