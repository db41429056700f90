"""The batching scheduler and admission control, in process.

The model is the tiny ONNX bundle (real onnxruntime) where outputs matter; where the test
is about the queue itself, a gate model holds the scheduler thread on purpose so the queue
builds up deterministically (no sleeps, no timing)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest

from service.admission import Admission, ServerBusy
from service.config import Settings
from service.inference import ModelRunner
from service.scheduler import BatchScheduler, DeadlineExceeded, SchedulerClosed, run_sync


class GateModel:
    """Records each batch it runs; blocks in run() until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[int]] = []

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.started.set()
        assert self.release.wait(30), "the test never released the gate"
        self.batches.append([int(image[0, 0, 0]) for image in batch])
        return {
            "probabilities": batch[:, 0, 0, :2].astype(np.float32),
            "features": batch.reshape(len(batch), -1)[:, :4].astype(np.float32),
        }


def _image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _hold(scheduler: BatchScheduler, model: GateModel) -> None:
    """Put one job in the model and wait until the scheduler thread is inside it."""
    scheduler.submit(model, [_image(0)])
    assert model.started.wait(30)


def test_concurrent_jobs_merge_into_one_batch_in_order() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=8)
    try:
        _hold(scheduler, model)
        futures = [scheduler.submit(model, [_image(v)])[0] for v in (1, 2, 3)]
        futures += scheduler.submit(model, [_image(4), _image(5)])
        model.release.set()
        results = [future.result(30) for future in futures]
    finally:
        scheduler.close()
    assert model.batches == [[0], [1, 2, 3, 4, 5]]
    assert {r.run_id for r in results} == {2} and {r.batch_size for r in results} == {5}
    # Every output of the graph comes back per image, not just probabilities.
    assert [r.outputs[0]["features"][0] for r in results] == [1, 2, 3, 4]
    assert [o["probabilities"][0] for o in results[3].outputs] == [4, 5]


def test_batches_never_exceed_max_batch_size_and_big_jobs_are_split() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=3)
    try:
        _hold(scheduler, model)
        futures = scheduler.submit(model, [_image(v) for v in range(1, 8)])
        assert len(futures) == 3  # 3 + 3 + 1
        model.release.set()
        outputs = [o for future in futures for o in future.result(30).outputs]
    finally:
        scheduler.close()
    assert [int(o["features"][0]) for o in outputs] == list(range(1, 8))
    assert all(len(batch) <= 3 for batch in model.batches)


def test_cancelled_jobs_are_dropped_and_never_run() -> None:
    dropped: list[tuple[str, int]] = []

    class Hooks:
        def model_run(self, batch_size: int, seconds: float) -> None:
            pass

        def dropped(self, reason: str, images: int) -> None:
            dropped.append((reason, images))

        def queue_depth(self, images: int) -> None:
            pass

    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=1, hooks=Hooks())
    try:
        _hold(scheduler, model)
        keep = scheduler.submit(model, [_image(1)])[0]
        gone = scheduler.submit(model, [_image(2), _image(3)])  # max 1: two jobs
        for future in gone:
            assert future.cancel()
        model.release.set()
        assert keep.result(30).outputs[0]["features"][0] == 1
        run_sync(scheduler, model, [_image(9)], timeout=30)  # the queue is past them now
    finally:
        scheduler.close()
    assert model.batches == [[0], [1], [9]]
    assert dropped == [("cancelled", 1), ("cancelled", 1)]
    for future in gone:
        with pytest.raises(CancelledError):
            future.result(0)


def test_jobs_past_their_deadline_are_dropped_with_deadline_exceeded() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=4)
    try:
        _hold(scheduler, model)
        late = scheduler.submit(model, [_image(1)], deadline=time.monotonic() - 1)[0]
        on_time = scheduler.submit(model, [_image(2)], deadline=time.monotonic() + 300)[0]
        model.release.set()
        with pytest.raises(DeadlineExceeded):
            late.result(30)
        assert on_time.result(30).outputs[0]["features"][0] == 2
    finally:
        scheduler.close()
    assert model.batches == [[0], [2]]


def test_a_batch_holds_one_model_only() -> None:
    first, second = GateModel(), GateModel()
    second.release.set()
    scheduler = BatchScheduler(max_batch_size=8)
    try:
        _hold(scheduler, first)
        futures = [
            scheduler.submit(model, [_image(v)])[0]
            for model, v in ((first, 1), (second, 2), (second, 3), (first, 4))
        ]
        first.release.set()
        for future in futures:
            future.result(30)
    finally:
        scheduler.close()
    assert first.batches == [[0], [1], [4]]
    assert second.batches == [[2, 3]]


def test_max_wait_lets_a_batch_fill() -> None:
    class Counting:
        def __init__(self) -> None:
            self.batches: list[int] = []

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.batches.append(len(batch))
            return {"probabilities": batch[:, 0, 0, :2].astype(np.float32)}

    model = Counting()
    # A long wait; the batch is full (4) long before it ends, and runs at once then.
    scheduler = BatchScheduler(max_batch_size=4, max_wait_s=60)
    try:
        futures = [scheduler.submit(model, [_image(v)])[0] for v in range(4)]
        for future in futures:
            future.result(30)
    finally:
        scheduler.close()
    assert model.batches == [4]


def test_close_fails_what_is_queued() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=1)
    _hold(scheduler, model)
    queued = scheduler.submit(model, [_image(1)])[0]
    threading.Timer(0.2, model.release.set).start()
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        queued.result(30)
    with pytest.raises(SchedulerClosed):
        scheduler.submit(model, [_image(2)])


def test_runner_results_equal_unbatched_onnxruntime(tiny_bundle: Path) -> None:
    """Merged into batches by the scheduler, every image gets exactly the outputs it gets
    alone (batch of 1, straight from onnxruntime)."""
    runner = ModelRunner(Settings(model_dir=tiny_bundle, providers="cpu", max_batch_size=16))
    runner.load()
    assert runner.ready, runner.error
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(24)]
    try:

        async def all_at_once() -> list:
            return await asyncio.gather(*(runner.predict([image]) for image in images))

        batched = [outputs[0] for outputs in asyncio.run(all_at_once())]
        model = runner.require_model()
        alone = [model.run(image[None]) for image in images]
    finally:
        runner.close()
    assert max(output.batch_size for output in batched) > 1, "nothing was merged"
    for output, reference in zip(batched, alone, strict=True):
        assert set(output.outputs) == set(reference)
        for name, value in reference.items():
            assert np.array_equal(output.outputs[name], value[0]), name
        assert output.meta.name == "tiny-test-model"


def test_admission_counts_images_and_refuses_when_full() -> None:
    seen: list[int] = []
    admission = Admission(max_images=3, on_change=seen.append)
    with admission.enter() as first:
        first.grow(2)  # a batch of two files
        with admission.enter():
            assert admission.in_flight == 3
            with pytest.raises(ServerBusy, match="busy"):
                admission.enter()
        assert admission.in_flight == 2
    assert admission.in_flight == 0
    # A request admitted with room for one may still bring its whole batch.
    with admission.enter(), admission.enter() as batch:
        batch.grow(32)
        assert admission.in_flight == 33
    assert admission.in_flight == 0 and seen[-1] == 0


def test_idle_scheduler_releases_the_last_models_memory_once() -> None:
    class Releasing:
        def __init__(self) -> None:
            self.released = threading.Event()
            self.releases = 0

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            return {"probabilities": batch[:, 0, 0, :2].astype(np.float32)}

        def release_memory(self) -> None:
            self.releases += 1
            self.released.set()

    model = Releasing()
    scheduler = BatchScheduler(max_batch_size=4, idle_release_s=0.05)
    try:
        assert not model.released.wait(0.3)  # nothing ran yet: nothing to give back
        run_sync(scheduler, model, [_image(1)], timeout=30)
        assert model.released.wait(30)
        time.sleep(0.3)  # idle again, but nothing ran since: no second release
        assert model.releases == 1
        run_sync(scheduler, model, [_image(2)], timeout=30)  # still serves afterwards
    finally:
        scheduler.close()


def test_release_memory_on_a_real_session(tiny_bundle: Path) -> None:
    runner = ModelRunner(Settings(model_dir=tiny_bundle, providers="cpu"))
    runner.load()
    try:
        model = runner.require_model()
        before = model.run(np.full((1, 64, 64, 3), 99, dtype=np.uint8))
        model.release_memory()
        after = model.run(np.full((1, 64, 64, 3), 99, dtype=np.uint8))
        assert np.array_equal(before["probabilities"], after["probabilities"])
    finally:
        runner.close()


def test_run_if_idle_runs_on_the_calling_thread_only_when_idle() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=4)
    try:
        model.release.set()
        ran_on: list[str] = []
        original = model.run

        def recording(batch: np.ndarray) -> dict[str, np.ndarray]:
            ran_on.append(threading.current_thread().name)
            return original(batch)

        model.run = recording  # type: ignore[method-assign]
        result = scheduler.run_if_idle(model, [_image(7), _image(8)])
        assert result is not None and result.batch_size == 2
        assert [o["features"][0] for o in result.outputs] == [7, 8]
        assert ran_on == [threading.current_thread().name]  # this thread, no hop
        assert scheduler.run_if_idle(model, [_image(1)] * 5) is None  # over max_batch_size

        model.release.clear()
        model.started.clear()
        _hold(scheduler, model)  # the scheduler thread is inside a run now
        assert scheduler.run_if_idle(model, [_image(9)]) is None  # busy: submit instead
        queued = scheduler.submit(model, [_image(10)])[0]
        model.release.set()
        assert queued.result(30).outputs[0]["features"][0] == 10
    finally:
        scheduler.close()
    assert model.batches == [[7, 8], [0], [10]]


def test_run_if_idle_uses_the_models_lone_run_and_batches_do_not() -> None:
    class TwoWays:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.calls.append("run")
            return {"probabilities": batch[:, 0, 0, :2].astype(np.float32)}

        def run_lone(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.calls.append("run_lone")
            return self.run(batch)

    model = TwoWays()
    scheduler = BatchScheduler(max_batch_size=4)
    try:
        assert scheduler.run_if_idle(model, [_image(1)]) is not None
        run_sync(scheduler, model, [_image(2)], timeout=30)
    finally:
        scheduler.close()
    assert model.calls == ["run_lone", "run", "run"]


def test_run_if_idle_and_the_scheduler_never_run_the_model_at_once() -> None:
    """One model call at a time, whoever makes it: callers' run_if_idle and the
    scheduler thread's batches, from several threads at once."""

    class Counting:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.inside = 0
            self.most_inside = 0
            self.images = 0

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            with self.lock:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
            time.sleep(0.001)  # long enough for the others to try
            with self.lock:
                self.inside -= 1
                self.images += len(batch)
            return {"probabilities": batch[:, 0, 0, :2].astype(np.float32)}

    model = Counting()
    scheduler = BatchScheduler(max_batch_size=4)
    answers: list[int] = []
    paths: list[str] = []

    def client(value: int) -> None:
        for _ in range(20):
            result = scheduler.run_if_idle(model, [_image(value)])
            paths.append("idle" if result is not None else "queued")
            if result is None:
                result = scheduler.submit(model, [_image(value)])[0].result(30)
            answers.append(int(result.outputs[0]["probabilities"][0]))

    try:
        threads = [threading.Thread(target=client, args=(v,)) for v in range(1, 7)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        scheduler.close()
    assert model.most_inside == 1
    assert {"idle", "queued"} <= set(paths)  # both ways in were taken
    assert model.images == 120 and sorted(answers) == sorted(
        v for v in range(1, 7) for _ in range(20)
    )


class MeetingModel:
    """Each run waits, up to `patience` s, until `parties` runs are inside run() at once:
    with fewer workers than parties every run times out, and records that."""

    def __init__(self, parties: int, patience: float = 10.0) -> None:
        self.barrier = threading.Barrier(parties, timeout=patience)
        self.lock = threading.Lock()
        self.batches: list[tuple[str, list[int], bool]] = []

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            self.barrier.wait()
            met = True
        except threading.BrokenBarrierError:
            met = False
        with self.lock:
            values = [int(image[0, 0, 0]) for image in batch]
            self.batches.append((threading.current_thread().name, values, met))
        return {"probabilities": batch[:, 0, 0, :2].astype(np.float32)}


def test_workers_run_batches_side_by_side() -> None:
    model = MeetingModel(parties=2)
    scheduler = BatchScheduler(max_batch_size=8, workers=2)
    try:
        futures = [scheduler.submit(model, [_image(v)])[0] for v in (1, 2)]
        results = [future.result(30) for future in futures]
    finally:
        scheduler.close()
    assert sorted(values for _, values, _ in model.batches) == [[1], [2]]
    assert all(met for _, _, met in model.batches)  # both were in run() at once
    assert len({name for name, _, _ in model.batches}) == 2  # on two worker threads
    assert len({r.run_id for r in results}) == 2


def test_one_worker_runs_one_batch_at_a_time() -> None:
    model = MeetingModel(parties=2, patience=0.5)
    scheduler = BatchScheduler(max_batch_size=1)
    try:
        for future in [scheduler.submit(model, [_image(v)])[0] for v in (1, 2)]:
            future.result(30)
    finally:
        scheduler.close()
    assert [met for _, _, met in model.batches] == [False, False]


def test_a_large_request_is_shared_out_between_idle_workers() -> None:
    """A request's images are cut into one chunk per worker (within max_batch_size), and
    a worker takes only its share of the queue while the other is idle."""
    model = MeetingModel(parties=2)
    scheduler = BatchScheduler(max_batch_size=8, workers=2)
    try:
        futures = scheduler.submit(model, [_image(v) for v in range(10)])
        assert len(futures) == 2
        outputs = [o for future in futures for o in future.result(30).outputs]
    finally:
        scheduler.close()
    assert sorted(values for _, values, _ in model.batches) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert all(met for _, _, met in model.batches)
    assert [o["probabilities"][0] for o in outputs] == list(range(10))  # in request order


def test_queued_jobs_are_shared_out_when_the_workers_wake_together() -> None:
    lone_model, model = GateModel(), MeetingModel(parties=2)
    scheduler = BatchScheduler(max_batch_size=8, workers=2)
    lone: list[object] = []
    try:
        # A lone run on another thread keeps both workers waiting while four jobs queue.
        caller = threading.Thread(
            target=lambda: lone.append(scheduler.run_if_idle(lone_model, [_image(0)]))
        )
        caller.start()
        assert lone_model.started.wait(30)
        futures = [scheduler.submit(model, [_image(v)])[0] for v in (1, 2, 3, 4)]
        lone_model.release.set()
        caller.join(30)
        for future in futures:
            future.result(30)
    finally:
        scheduler.close()
    assert lone and lone[0] is not None
    # The first worker awake took half, and both runs were inside the model at once.
    assert sorted(values for _, values, _ in model.batches) == [[1, 2], [3, 4]]
    assert all(met for _, _, met in model.batches)


def test_run_if_idle_waits_for_every_worker() -> None:
    model = GateModel()
    scheduler = BatchScheduler(max_batch_size=4, workers=2)
    try:
        _hold(scheduler, model)  # one worker busy, the other idle, nothing queued
        assert scheduler.run_if_idle(model, [_image(9)]) is None
        model.release.set()
    finally:
        scheduler.close()


def test_the_memory_release_never_runs_beside_a_batch() -> None:
    class Releasing(GateModel):
        def __init__(self) -> None:
            super().__init__()
            self.inside = 0
            self.releases: list[int] = []  # how many runs were inside at each release
            self.released = threading.Event()

        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.inside += 1
            try:
                return super().run(batch)
            finally:
                self.inside -= 1

        def release_memory(self) -> None:
            self.releases.append(self.inside)
            self.released.set()

    model = Releasing()
    scheduler = BatchScheduler(max_batch_size=4, workers=2, idle_release_s=0.05)
    try:
        model.release.set()
        run_sync(scheduler, model, [_image(1)], timeout=30)  # something to give back
        model.release.clear()
        model.started.clear()
        model.released.clear()
        _hold(scheduler, model)  # one worker in a run, the other idle for 20 idle periods
        time.sleep(1.0)
        during = list(model.releases)
        model.release.set()
        assert model.released.wait(30)  # once all are idle, it is given back
    finally:
        scheduler.close()
    assert all(inside == 0 for inside in model.releases), model.releases
    assert len(model.releases) >= len(during) + 1


def test_memory_is_released_after_lone_runs_too() -> None:
    class Releasing(GateModel):
        def __init__(self) -> None:
            super().__init__()
            self.released = threading.Event()

        def release_memory(self) -> None:
            self.released.set()

    model = Releasing()
    model.release.set()
    scheduler = BatchScheduler(max_batch_size=4, workers=2, idle_release_s=0.05)
    try:
        for value in range(3):
            assert scheduler.run_if_idle(model, [_image(value)]) is not None
        assert model.released.wait(30)
    finally:
        scheduler.close()


def test_workers_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import onnx_session
    from service.onnx_session import SessionThreads, model_workers

    def settings(**values: int) -> Settings:
        return Settings.model_construct(**values)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_session, "usable_cores", lambda: 2)
    assert model_workers(settings(), cuda=False) == 2
    assert model_workers(settings(), cuda=True) == 1
    assert model_workers(settings(intra_op_threads=1), cuda=False) == 1
    assert model_workers(settings(model_workers=3), cuda=True) == 3
    # Each run gets its share of the model's threads; one worker keeps onnxruntime's own.
    assert SessionThreads.of(settings(), workers=2).intra_op == 1
    assert SessionThreads.of(settings(intra_op_threads=6), workers=3).intra_op == 2
    assert SessionThreads.of(settings(intra_op_threads=1), workers=2).intra_op == 1
    assert SessionThreads.of(settings(), workers=1).intra_op == 0
    monkeypatch.setattr(onnx_session, "usable_cores", lambda: 1)
    assert model_workers(settings(), cuda=False) == 1
