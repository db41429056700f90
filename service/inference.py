"""The model at run time: load a bundle, run it through one batching scheduler, swap it live.

`ModelRunner.load()` is blocking and runs in a worker thread at start-up (the app answers
liveness meanwhile). Its state is `loading`, then `ready` (bundle verified, session built,
warm-up inference done) or `failed` (with the reason, shown by /health).

Images are decoded in `executor` (INFERENCE_THREADS threads) and run by one scheduler
thread (service.scheduler) that merges concurrent requests into batches. `predict()` is the
entry point of every route that runs the model.

Hot reload (`reload()`, on SIGHUP or POST /admin/reload): the new bundle is loaded and
warmed up beside the old one, then served by one assignment; requests already queued
finish on the model they started with. When the new bundle fails to load, the old one
keeps serving and `last_reload` says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from service import collector
from service.admission import Admission
from service.bundle import (
    EXPLAIN_OUTPUTS,
    FEATURES_NAME,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    BundleMeta,
    read_bundle,
)
from service.config import Settings
from service.gate import GATE_DISTANCES, InputGate
from service.onnx_session import (
    CPU,
    CUDA,
    SessionThreads,
    available_providers,
    choose_providers,
    make_session,
    model_workers,
)
from service.scheduler import BatchScheduler, JobResult, Outputs, run_sync
from service.scoring import normalise, positive_probability

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger("pneumoscreen.model")

State = Literal["loading", "ready", "failed"]

# Longest wait for a warm-up inference (it queues behind requests already waiting).
WARM_UP_TIMEOUT_S = 300.0


class ModelNotReady(RuntimeError):
    """The model is still loading or failed to load: the API answers 503 model_not_ready
    (service/errors.py)."""


class ReloadInProgress(RuntimeError):
    """A load or reload is already running: 409 reload_in_progress (service/errors.py)."""


@dataclass(frozen=True)
class Scored:
    """The outcome for one image."""

    label: str
    screen_positive: bool
    probabilities: dict[str, float]
    positive_probability: float


def score(meta: BundleMeta, row: np.ndarray) -> Scored:
    """One row of model output -> label, screening decision and probabilities.

    Probabilities and P(positive) come from service.scoring, the same functions training
    used to choose the threshold (renormalised in float64 so they sum to 1 despite
    float32 rounding). The label follows the threshold: when positive, the most probable
    positive label (positive_label itself for a two-label model); otherwise the most
    probable of the others (negative_label for a two-label model).
    """
    values = normalise(row)
    positive = meta.positive_indices()
    p_positive = float(positive_probability(row, positive))
    screen_positive = p_positive >= meta.threshold
    if len(meta.labels) == 2:
        label = meta.positive_label if screen_positive else meta.negative_label
    else:
        group = (
            positive
            if screen_positive
            else [i for i in range(len(meta.labels)) if i not in positive]
        )
        label = meta.labels[max(group, key=lambda i: values[i])]
    return Scored(
        label=label,
        screen_positive=bool(screen_positive),
        probabilities={name: float(p) for name, p in zip(meta.labels, values, strict=True)},
        positive_probability=p_positive,
    )


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One bundle, verified and loaded into an onnxruntime session (and, on the CPU, a
    second one for lone images: `lone_session`)."""

    meta: BundleMeta
    directory: Path
    session: Any  # onnxruntime.InferenceSession
    providers: list[str]
    output_names: list[str]
    loaded_at: datetime
    gate: InputGate | None = None  # this bundle's input gate (format 2), None for format 1
    # The same graph in a session whose intra-op threads spin between operators, for a lone
    # image on an idle model (LONE_REQUEST_SPINNING); None on CUDA or when switched off.
    lone_session: Any = None

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """A uint8 (batch, H, W, 3) array -> every output of the graph, by name, and the
        input gate's distances (GATE_DISTANCES) when the gate is on. The distances are one
        matrix product for the whole batch here, on the model's thread, rather than one
        per image wherever it is judged."""
        return self._run(self.session, batch)

    def run_lone(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """`run` for a lone image on an idle model (service.scheduler.run_if_idle): on the
        spinning session when there is one. Spinning threads would take the cores that
        decoding needs under load, and nothing else is running now."""
        return self._run(self.lone_session or self.session, batch)

    def _run(self, session: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = session.run(self.output_names, {INPUT_NAME: batch})
        outputs = {
            name: np.asarray(value) for name, value in zip(self.output_names, values, strict=True)
        }
        gate = self.gate
        if gate is not None and gate.enabled and FEATURES_NAME in outputs:
            outputs[GATE_DISTANCES] = gate.stats.distances(outputs[FEATURES_NAME])
        return outputs

    def release_memory(self) -> None:
        """Shrink onnxruntime's memory arena back to what one image needs: it otherwise
        keeps the size of the largest batch seen (hundreds of MB at 32 images). The
        scheduler calls this when idle; it costs one single-image inference."""
        import onnxruntime as ort

        options = ort.RunOptions()
        devices = "cpu:0;gpu:0" if CUDA in self.providers else "cpu:0"
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", devices)
        one = np.zeros((1, self.meta.input.height, self.meta.input.width, 3), dtype=np.uint8)
        self.session.run(self.output_names, {INPUT_NAME: one}, options)


@dataclass(frozen=True)
class _LoneWarmUp:
    """A model's lone-request session as a BatchModel, to warm it up through the
    scheduler (one model call at a time, also during a reload)."""

    model: LoadedModel

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run_lone(batch)


@dataclass(frozen=True)
class ModelOutput:
    """One image through the model."""

    outputs: Outputs  # every ONNX output by name, this image's row (no batch axis)
    meta: BundleMeta  # the bundle that produced it
    gate: InputGate | None  # that bundle's input gate
    run_id: int  # the model run (batch) it was part of
    run_ms: float  # how long that run took
    batch_size: int  # images in that run, from all requests
    queue_ms: float = 0.0  # how long it waited for that run

    @property
    def probabilities(self) -> np.ndarray:
        return self.outputs[OUTPUT_NAME]

    def score(self) -> Scored:
        return score(self.meta, self.probabilities)


def _model_outputs(model: LoadedModel, results: list[JobResult]) -> list[ModelOutput]:
    return [
        ModelOutput(
            outputs=outputs,
            meta=model.meta,
            gate=model.gate,
            run_id=result.run_id,
            run_ms=result.run_seconds * 1000.0,
            batch_size=result.batch_size,
            queue_ms=result.queued_seconds * 1000.0,
        )
        for result in results
        for outputs in result.outputs
    ]


@dataclass(frozen=True)
class ReloadOutcome:
    """What the last load or reload did (shown by /health and /model)."""

    ok: bool
    trigger: str  # "startup", "admin" (POST /admin/reload) or "sighup"
    finished_at: datetime
    duration_ms: float
    serving: BundleMeta | None  # the bundle serving after the attempt
    error: str | None = None


class ModelRunner:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state: State = "loading"
        self.error: str | None = None
        self.last_reload: ReloadOutcome | None = None
        self._model: LoadedModel | None = None
        self._load_lock = threading.Lock()
        # Decoding and preprocessing; the model itself runs on the scheduler's workers.
        self.executor = ThreadPoolExecutor(
            max_workers=settings.inference_threads, thread_name_prefix="pneumoscreen-decode"
        )
        # Model runs side by side (MODEL_WORKERS), each on its share of the model's threads.
        cuda = settings.providers != "cpu" and CUDA in available_providers()
        self.workers = model_workers(settings, cuda)
        if metrics is not None:
            metrics.model_workers.set(self.workers)
        hooks = metrics.scheduler_hooks() if metrics is not None else None
        self.scheduler = BatchScheduler(
            settings.max_batch_size,
            settings.max_batch_wait_ms / 1000.0,
            hooks=hooks,
            workers=self.workers,
        )
        self.admission = Admission(
            settings.max_queue,
            on_change=metrics.admitted_images.set if metrics is not None else None,
        )

    # --- what is serving ----------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def meta(self) -> BundleMeta | None:
        model = self._model
        return model.meta if model is not None else None

    @property
    def providers(self) -> list[str]:
        model = self._model
        return list(model.providers) if model is not None else []

    @property
    def gate(self) -> InputGate | None:
        """The serving bundle's input gate (None for a format 1 bundle or before a load).
        A request judges with the gate of the model it ran on (`ModelOutput.gate`)."""
        model = self._model
        return model.gate if model is not None else None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._model is not None

    def require_model(self) -> LoadedModel:
        """The model serving now, or ModelNotReady (503 model_not_ready) while loading or
        after a failed first load."""
        model = self._model
        if self.state != "ready" or model is None:
            reason = self.error or "the model is still loading"
            raise ModelNotReady(f"the model is not ready: {reason}")
        return model

    def require_ready(self) -> BundleMeta:
        """The serving bundle's metadata, or ModelNotReady (see require_model)."""
        return self.require_model().meta

    # --- running ------------------------------------------------------------------------

    async def predict(
        self,
        images: list[np.ndarray],
        deadline: float | None = None,
        model: LoadedModel | None = None,
    ) -> list[ModelOutput]:
        """Run decoded images through the model; one ModelOutput per image, in order.

        `images` are uint8 (H, W, 3) arrays at the bundle's input size, as
        `service.preprocessing.load_model_input` makes them. Each ModelOutput holds every
        output of the graph for its image (`outputs`, name -> array without the batch
        axis), the bundle that produced it, and the model run it was part of.

        The scheduler may merge these images with other requests' into one model call
        (MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS); each image's outputs are those of running it
        alone. `deadline` (a time.monotonic() value): images still queued then are dropped
        and DeadlineExceeded (service.scheduler) is raised. Cancelling the awaiting task
        drops the images not yet run. `model` pins the model decoded for (default: the one
        serving now). Raises ModelNotReady before the first successful load.

        Admission (MAX_QUEUE) is the caller's job, before it reads a request's body:
        `with runner.admission.enter() as ticket: ...` (ServerBusy -> 503 server_busy).
        """
        model = model or self.require_model()
        if not images:
            return []
        futures = self.scheduler.submit(model, images, deadline)
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for future in futures:  # what has not run yet is dropped (no-op when done)
                future.cancel()
        return _model_outputs(model, results)

    def run_if_idle(self, images: list[np.ndarray], model: LoadedModel) -> list[ModelOutput] | None:
        """Blocking (a decode worker, right after decoding): run `images` on this thread
        now if the model is idle and nothing is queued, else None, and they go through
        `predict` (service.scheduler.BatchScheduler.run_if_idle)."""
        result = self.scheduler.run_if_idle(model, images)
        return None if result is None else _model_outputs(model, [result])

    def predict_outputs(self, images: list[np.ndarray]) -> list[Outputs]:
        """Blocking, for offline tools (site calibration, bench), never the event loop:
        every output by name per image, through the same scheduler as predict()."""
        model = self.require_model()
        if not images:
            return []
        return run_sync(self.scheduler, model, images)

    # --- loading and reloading ----------------------------------------------------------

    def load(self) -> None:
        """The first load at start-up: verify, build, warm up. Never raises."""
        try:
            self.reload("startup")
        except ReloadInProgress:  # a reload got there first; it reports for itself
            pass

    def reload(self, trigger: str = "admin") -> ReloadOutcome:
        """Load MODEL_DIR beside the serving model, warm it up, then serve it (blocking).

        On failure the serving model (if any) stays, and the outcome says why. Raises
        ReloadInProgress when another load is running.
        """
        if not self._load_lock.acquire(blocking=False):
            raise ReloadInProgress("a model load is already in progress")
        started = time.perf_counter()
        directory = self.settings.model_dir
        try:
            try:
                model = self._load_model(directory)
            except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
                error = str(exc) or type(exc).__name__
                if self._model is None:
                    self.state, self.error = "failed", error
                log.error(
                    "model %s from %s failed: %s",
                    "load" if trigger == "startup" else "reload",
                    directory,
                    error,
                )
                outcome = ReloadOutcome(
                    ok=False,
                    trigger=trigger,
                    finished_at=datetime.now(UTC),
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    serving=self.meta,
                    error=error,
                )
            else:
                previous = self._model
                self._model = model  # the switch: new requests take this one
                self.state, self.error = "ready", None
                outcome = ReloadOutcome(
                    ok=True,
                    trigger=trigger,
                    finished_at=datetime.now(UTC),
                    duration_ms=(time.perf_counter() - started) * 1000.0,
                    serving=model.meta,
                )
                log.info(
                    "model %s %s (sha256 %s) %s in %.0f ms on %s%s",
                    model.meta.name,
                    model.meta.version,
                    model.meta.onnx_sha256[:12],
                    "ready" if trigger == "startup" else f"serving after {trigger} reload",
                    outcome.duration_ms,
                    ", ".join(model.providers),
                    f"; was {previous.meta.name} {previous.meta.version}" if previous else "",
                )
            self.last_reload = outcome
            self._report(outcome)
            collector.settle()  # full collections skip what outlives a load (service.collector)
            return outcome
        finally:
            self._load_lock.release()

    def start_reload(self, trigger: str) -> bool:
        """reload() in a background thread (SIGHUP); False when one is already running."""
        if self._load_lock.locked():
            log.warning("%s: a model load is already in progress; ignored", trigger)
            return False

        def run() -> None:
            try:
                self.reload(trigger)
            except ReloadInProgress:
                log.warning("%s: a model load is already in progress; ignored", trigger)

        threading.Thread(target=run, name="pneumoscreen-reload", daemon=True).start()
        return True

    def _load_model(self, directory: Path) -> LoadedModel:
        meta = read_bundle(directory, verify=True)
        wanted = choose_providers(self.settings.providers, available_providers())
        try:
            session = make_session(
                directory / MODEL_FILE,
                SessionThreads.of(self.settings, self.workers),
                providers=wanted,
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise RuntimeError(
                f"onnxruntime could not load {directory / MODEL_FILE}: {exc}"
            ) from None
        inputs = {i.name for i in session.get_inputs()}
        output_names = [o.name for o in session.get_outputs()]
        # Every run asks all outputs; probabilities always, features + cam (the gate and
        # heatmaps) in a format 2 bundle.
        wanted_outputs = [OUTPUT_NAME, *(EXPLAIN_OUTPUTS if meta.has_explain_outputs else ())]
        if INPUT_NAME not in inputs or not set(wanted_outputs) <= set(output_names):
            raise RuntimeError(
                f"model.onnx must have input '{INPUT_NAME}' and outputs {wanted_outputs} "
                f"(has inputs {sorted(inputs)}, outputs {sorted(output_names)})"
            )
        # The gate belongs to this bundle: a reload to another bundle brings its own.
        gate = InputGate.load(directory, meta, self.settings.gate_enabled)
        providers = list(session.get_providers())
        if self.settings.providers == "cuda" and CUDA not in providers:
            raise RuntimeError("PROVIDERS=cuda but the session fell back to CPU")
        model = LoadedModel(
            meta=meta,
            directory=directory,
            session=session,
            providers=providers,
            output_names=output_names,
            loaded_at=datetime.now(UTC),
            gate=gate,
        )
        if self.settings.lone_request_spinning and CUDA not in providers:
            try:
                lone = make_session(
                    directory / MODEL_FILE, SessionThreads.lone_of(self.settings), providers=[CPU]
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                raise RuntimeError(f"onnxruntime could not load a second session: {exc}") from None
            model = dataclasses.replace(model, lone_session=lone)
        # Warm-up: the first run allocates and optimises; do it before serving. It goes
        # through the scheduler, so it never runs beside another model call.
        warm = np.zeros((meta.input.height, meta.input.width, 3), dtype=np.uint8)
        try:
            (outputs,) = run_sync(self.scheduler, model, [warm], timeout=WARM_UP_TIMEOUT_S)
            if model.lone_session is not None:
                run_sync(self.scheduler, _LoneWarmUp(model), [warm], timeout=WARM_UP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported as the reason the load failed
            raise RuntimeError(f"the warm-up inference failed: {exc}") from None
        probabilities = outputs[OUTPUT_NAME]
        if probabilities.shape != (len(meta.labels),):
            raise RuntimeError(
                f"model output has shape {(1, *probabilities.shape)}; expected "
                f"(batch, {len(meta.labels)}) to match the labels in model.json"
            )
        score(meta, probabilities)
        if (
            gate is not None
            and meta.gate is not None
            and (outputs["features"].shape != (meta.gate.feature_dim,))
        ):
            raise RuntimeError(
                f"features output has shape {outputs['features'].shape}; the "
                f"gate expects {meta.gate.feature_dim} values"
            )
        return model

    def _report(self, outcome: ReloadOutcome) -> None:
        if self.metrics is None:
            return
        self.metrics.reloads.labels(outcome.trigger, "ok" if outcome.ok else "failed").inc()
        model = self._model
        if model is not None:
            meta = model.meta
            self.metrics.model_info.info(
                {
                    "name": meta.name,
                    "version": meta.version,
                    "sha256": meta.onnx_sha256,
                    "backbone": meta.backbone,
                    "providers": ",".join(model.providers),
                    "threshold": str(meta.threshold),
                }
            )
        self.metrics.model_ready.set(1 if self.ready else 0)

    def close(self) -> None:
        self.scheduler.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
