"""Dynamic batching: model runs on batches merged from concurrent requests.

Requests put their decoded images in one queue (`submit`); a scheduler worker thread takes
from its head as many images as fit in `max_batch_size` and runs them through the model in
one call, like Triton's dynamic batcher: when a worker is free it runs what is queued at
once (`max_wait_s` 0, the default), or waits up to `max_wait_s` after the oldest image for
the batch to fill.

`workers` threads take batches side by side, like Triton's model instances: on the CPU
each run then computes on onnxruntime's threads of its own share (service.inference gives
each run INTRA_OP_THREADS / MODEL_WORKERS), so the model never has more threads than its
share of the cores, and concurrent requests never oversubscribe them. Two runs of one
thread each keep two cores busy through the operators one run could not spread over both
(bench/README.md). While other workers are idle, a worker takes only its fair share of
what is queued, and `submit` cuts a request's images into one chunk per worker, so one
large request is spread over all of them too.

A caller with a lone image may run it itself when every worker is idle and nothing is
queued (`run_if_idle`): without the hop to a worker thread and back, and on the CPU on a
session that uses all the model's threads. Such a run, like the memory release below,
runs alone: the workers wait for it.

Work that nobody waits for is never run: a job whose future was cancelled (its client
disconnected or gave up) or whose deadline has passed when it reaches the head of the
queue is dropped, and counted.

Each job names the model it runs on, so a hot reload (service.inference) can switch models
while jobs for the old one are still queued: a batch only ever holds one model's jobs.

After `idle_release_s` without work, the scheduler asks the last model to give back the
memory its big batches took (`release_memory`, when the model has it): onnxruntime keeps
its arena at the size of the largest batch otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("pneumoscreen.scheduler")

# Every output of the ONNX graph, by name, for one image (the batch axis removed).
Outputs = dict[str, np.ndarray]


class BatchModel(Protocol):
    """What the scheduler runs: a whole batch in, every output (batch axis first) out.
    It may also have `release_memory()`, called when the scheduler has been idle, and
    `run_lone(batch)`, used instead of `run` by `run_if_idle`."""

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


class DeadlineExceeded(TimeoutError):
    """A job's deadline passed before the model got to it (service/errors.py: 504)."""


class SchedulerClosed(RuntimeError):
    """The scheduler was shut down before the job ran."""


@dataclass(frozen=True)
class JobResult:
    """One job's images through the model: their outputs, and the run that produced them."""

    outputs: list[Outputs]
    run_id: int
    run_seconds: float
    batch_size: int
    queued_seconds: float = 0.0  # how long the job waited in the queue for this run


@dataclass
class _Job:
    model: BatchModel
    images: list[np.ndarray]
    future: Future[JobResult]
    deadline: float | None  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)


class SchedulerHooks(Protocol):
    """Where the scheduler reports what it did (service.metrics implements it)."""

    def model_run(self, batch_size: int, seconds: float) -> None: ...
    def dropped(self, reason: str, images: int) -> None: ...
    def queue_depth(self, images: int) -> None: ...


class _NoHooks:
    def model_run(self, batch_size: int, seconds: float) -> None:
        pass

    def dropped(self, reason: str, images: int) -> None:
        pass

    def queue_depth(self, images: int) -> None:
        pass


class BatchScheduler:
    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float = 0.0,
        hooks: SchedulerHooks | None = None,
        name: str = "pneumoscreen-model",
        idle_release_s: float | None = 2.0,
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.max_batch_size = max_batch_size
        self.workers = workers
        self.max_wait_s = max(0.0, max_wait_s)
        self.hooks: SchedulerHooks = hooks or _NoHooks()
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # workers running a batch
        self._alone = False  # a call that runs alone: a caller's lone image, or the release
        self._idle_since = time.monotonic()  # when the last model call ended
        self._runs = 0
        self.idle_release_s = idle_release_s
        self._ran_since_release: BatchModel | None = None  # the model to release, if any
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(index,),
                name=name if workers == 1 else f"{name}_{index}",
                daemon=True,
            )
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # --- callers (any thread) -----------------------------------------------------------

    def submit(
        self, model: BatchModel, images: list[np.ndarray], deadline: float | None = None
    ) -> list[Future[JobResult]]:
        """Queue `images` for `model`; one future per chunk of them.

        A chunk has at most max_batch_size images, and with several workers about an equal
        share of the request for each (so they run it side by side). The chunks go in
        together, in order, so a request's images stay side by side in the queue (and in
        one batch when they fit and one worker is free). Cancel a future to drop its chunk.
        """
        size = self._share(len(images), self.workers)
        chunks = [images[start : start + size] for start in range(0, len(images), size)]
        jobs = [_Job(model, chunk, Future(), deadline) for chunk in chunks]
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the model scheduler is shut down")
            self._queue.extend(jobs)
            self._queued_images += len(images)
            self.hooks.queue_depth(self._queued_images)
            self._cond.notify()
        return [job.future for job in jobs]

    @property
    def queued_images(self) -> int:
        """Images waiting for the model (not counting the batch being run)."""
        return self._queued_images

    def run_if_idle(self, model: BatchModel, images: list[np.ndarray]) -> JobResult | None:
        """Run `images` on the calling thread, now, if every worker is idle and nothing is
        queued; else None (then `submit` them). A lone request then costs no hop to a
        worker thread and back, and its image is run where it was just decoded; under
        load the workers are busy and requests are merged into batches as before. The
        workers wait while it runs."""
        if not images or len(images) > self.max_batch_size:
            return None
        with self._cond:
            if self._busy or self._alone or self._queue or self._closed:
                return None
            self._alone = True
            run_id = self._next_run_id()
            starts_timer = self._ran_since_release is None  # worker 0 waits untimed now
        try:
            return self._execute(model, images, run_id, lone=True)
        finally:
            with self._cond:
                self._alone = False
                self._idle_since = time.monotonic()
                # Otherwise no worker has anything to do: let them sleep.
                if self._queue or starts_timer:
                    self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; fail the queued ones with SchedulerClosed; join the thread."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(SchedulerClosed("the server is shutting down"))
        for thread in self._threads:
            if threading.current_thread() is not thread:
                thread.join(timeout)

    # --- the scheduler thread -----------------------------------------------------------

    def _loop(self, index: int) -> None:
        while True:
            release: BatchModel | None = None
            with self._cond:
                # Wait for work, and for a call that runs alone to finish. Worker 0 also
                # gives the model's memory back when all have been idle for a while.
                while (not self._queue or self._alone) and not self._closed:
                    if (
                        index != 0
                        or self._busy
                        or self._ran_since_release is None
                        or self.idle_release_s is None
                    ):
                        self._cond.wait()
                        continue
                    # A lone run ends without waking the workers (unless work is queued),
                    # so worker 0 keeps time itself while one runs.
                    remaining = self._idle_since + self.idle_release_s - time.monotonic()
                    if self._alone or remaining > 0:
                        self._cond.wait(remaining if remaining > 0 else self.idle_release_s)
                        continue
                    release, self._ran_since_release = self._ran_since_release, None
                    self._alone = True  # the release is a model call too, alone
                    break
                if self._closed:
                    return
                batch = self._take() if release is None else []
                if batch:
                    self._busy += 1
                    run_id = self._next_run_id()
                    if self._queue:
                        self._cond.notify()  # what is left is another idle worker's
            try:
                if release is not None:
                    self._release(release)
                if batch:
                    self._run(batch, run_id)
            finally:
                if release is not None or batch:
                    with self._cond:
                        if release is not None:
                            self._alone = False
                        if batch:
                            self._busy -= 1
                            self._idle_since = time.monotonic()
                        self._cond.notify_all()

    def _next_run_id(self) -> int:
        """The next model call's number (the lock is held)."""
        self._runs += 1
        return self._runs

    def _release(self, model: BatchModel) -> None:
        release = getattr(model, "release_memory", None)
        if release is None:
            return
        try:
            release()
        except Exception:  # only memory is at stake; serving goes on
            log.exception("releasing the model's memory failed")

    def _take(self) -> list[_Job]:
        """Jobs from the head of the queue for one model call (the lock is held): up to
        max_batch_size images, and while other workers are idle, about this worker's share
        of the queue (at least one job)."""
        self._drop_dead_head()
        if not self._queue:
            return []
        if self.max_wait_s > 0:
            until = self._queue[0].enqueued + self.max_wait_s
            while not self._closed and self._fill() < self.max_batch_size:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                self._drop_dead_head()
                if not self._queue:
                    return []
        model = self._queue[0].model
        limit = self._share(self._queued_images, self.workers - self._busy)  # idle: me too
        taken: list[_Job] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            if job.model is not model or (taken and size + len(job.images) > limit):
                break
            self._queue.popleft()
            self._queued_images -= len(job.images)
            if self._is_dead(job):
                continue
            # From here the job cannot be cancelled: it runs, and its result is delivered.
            if not job.future.set_running_or_notify_cancel():
                self.hooks.dropped("cancelled", len(job.images))
                continue
            taken.append(job)
            size += len(job.images)
        self.hooks.queue_depth(self._queued_images)
        return taken

    def _share(self, images: int, workers: int) -> int:
        """About an equal share of `images` for each of `workers`, within max_batch_size
        (at least one)."""
        return min(self.max_batch_size, max(1, math.ceil(images / workers)))

    def _fill(self) -> int:
        """Images at the head of the queue that could go in one batch right now."""
        model = self._queue[0].model
        size = 0
        for job in self._queue:
            if job.model is not model or size + len(job.images) > self.max_batch_size:
                break
            size += len(job.images)
        return size

    def _drop_dead_head(self) -> None:
        while self._queue and self._is_dead(self._queue[0]):
            job = self._queue.popleft()
            self._queued_images -= len(job.images)
        self.hooks.queue_depth(self._queued_images)

    def _is_dead(self, job: _Job) -> bool:
        """A cancelled job, or one past its deadline (then failed with DeadlineExceeded).
        Counted as dropped either way."""
        if job.future.cancelled():
            self.hooks.dropped("cancelled", len(job.images))
            return True
        if job.deadline is not None and time.monotonic() >= job.deadline:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    DeadlineExceeded("the request deadline passed while it waited for the model")
                )
                self.hooks.dropped("deadline", len(job.images))
            else:
                self.hooks.dropped("cancelled", len(job.images))
            return True
        return False

    def _execute(
        self, model: BatchModel, images: list[np.ndarray], run_id: int, lone: bool = False
    ) -> JobResult:
        """One model call (the caller counts it as busy or alone)."""
        self._ran_since_release = model
        started = time.perf_counter()
        batch = np.ascontiguousarray(np.stack(images).astype(np.uint8, copy=False))
        run = getattr(model, "run_lone", model.run) if lone else model.run
        per_image = _split(run(batch), len(images))
        seconds = time.perf_counter() - started
        self.hooks.model_run(len(images), seconds)
        return JobResult(
            outputs=per_image, run_id=run_id, run_seconds=seconds, batch_size=len(images)
        )

    def _run(self, jobs: list[_Job], run_id: int) -> None:
        images = [image for job in jobs for image in job.images]
        started = time.monotonic()
        try:
            result = self._execute(jobs[0].model, images, run_id)
        except Exception as exc:  # delivered to every waiting request
            log.exception("model run of %d image(s) failed", len(images))
            for job in jobs:
                job.future.set_exception(exc)
            return
        offset = 0
        for job in jobs:
            count = len(job.images)
            job.future.set_result(
                dataclasses.replace(
                    result,
                    outputs=result.outputs[offset : offset + count],
                    queued_seconds=started - job.enqueued,
                )
            )
            offset += count


def _split(outputs: dict[str, Any], count: int) -> list[Outputs]:
    """{name: (batch, ...)} -> one {name: (...)} per image, copied out of the batch."""
    rows: list[Outputs] = [{} for _ in range(count)]
    for name, value in outputs.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != count:
            raise RuntimeError(
                f"model output {name!r} has shape {array.shape}; expected the batch of "
                f"{count} first"
            )
        for index in range(count):
            rows[index][name] = array[index].copy()
    return rows


def run_sync(
    scheduler: BatchScheduler,
    model: BatchModel,
    images: list[np.ndarray],
    timeout: float | None = None,
) -> list[Outputs]:
    """Blocking helper (warm-ups, tests): the outputs of `images`, in order."""
    futures = scheduler.submit(model, images)
    outputs: list[Outputs] = []
    for future in futures:
        outputs.extend(future.result(timeout).outputs)
    return outputs
