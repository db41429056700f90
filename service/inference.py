"""The model at run time: load a bundle once, run it with onnxruntime, off the event loop.

`ModelRunner.load()` is blocking and runs in a worker thread at start-up (the app answers
liveness meanwhile). Its state is `loading`, then `ready` (bundle verified, session built,
warm-up inference done) or `failed` (with the reason, shown by /health).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.bundle import (
    EXPLAIN_OUTPUTS,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    BundleMeta,
    read_bundle,
)
from service.config import Settings
from service.gate import InputGate
from service.scoring import normalise, positive_probability

log = logging.getLogger("pneumoscreen.model")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

State = Literal["loading", "ready", "failed"]


class ModelNotReady(RuntimeError):
    """The model is still loading or failed to load: the API answers 503 model_not_ready
    (service/errors.py)."""


@dataclass(frozen=True)
class Scored:
    """The outcome for one image."""

    label: str
    screen_positive: bool
    probabilities: dict[str, float]
    positive_probability: float


def choose_providers(setting: str, available: list[str]) -> list[str]:
    if setting == "cpu":
        return [CPU]
    if setting == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                "PROVIDERS=cuda but onnxruntime reports no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use auto"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


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
        group = positive if screen_positive else [
            i for i in range(len(meta.labels)) if i not in positive
        ]
        label = meta.labels[max(group, key=lambda i: values[i])]
    return Scored(
        label=label,
        screen_positive=bool(screen_positive),
        probabilities={name: float(p) for name, p in zip(meta.labels, values, strict=True)},
        positive_probability=p_positive,
    )


class ModelRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: State = "loading"
        self.error: str | None = None
        self.meta: BundleMeta | None = None
        self.providers: list[str] = []
        # The outputs asked of every run: probabilities, and features + cam (format 2).
        self.output_names: list[str] = [OUTPUT_NAME]
        self.gate: InputGate | None = None
        self._session = None
        self.executor = ThreadPoolExecutor(
            max_workers=settings.inference_threads, thread_name_prefix="pneumoscreen-infer"
        )

    # --- loading ----------------------------------------------------------------------

    def load(self) -> None:
        """Verify the bundle, build the session and warm it up. Never raises."""
        started = time.perf_counter()
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - any failure is reported by /health
            self.state, self.error = "failed", str(exc) or type(exc).__name__
            log.error("model failed to load from %s: %s", self.settings.model_dir, self.error)
            return
        self.state = "ready"
        assert self.meta is not None
        log.info(
            "model %s %s ready in %.0f ms on %s",
            self.meta.name,
            self.meta.version,
            (time.perf_counter() - started) * 1000,
            ", ".join(self.providers),
        )

    def _load(self) -> None:
        import onnxruntime as ort

        directory = self.settings.model_dir
        meta = read_bundle(directory, verify=True)
        self.meta = meta
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = self.settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = list(ort.get_available_providers())
        wanted = choose_providers(self.settings.providers, available)
        try:
            session = ort.InferenceSession(
                str(directory / MODEL_FILE), sess_options=options, providers=wanted
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise RuntimeError(
                f"onnxruntime could not load {directory / MODEL_FILE}: {exc}"
            ) from None
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        wanted_outputs = [OUTPUT_NAME, *(EXPLAIN_OUTPUTS if meta.has_explain_outputs else ())]
        if INPUT_NAME not in inputs or not set(wanted_outputs) <= outputs:
            raise RuntimeError(
                f"model.onnx must have input '{INPUT_NAME}' and outputs {wanted_outputs} "
                f"(has inputs {sorted(inputs)}, outputs {sorted(outputs)})"
            )
        self.output_names = wanted_outputs
        self.gate = InputGate.load(directory, meta, self.settings.gate_enabled)
        self._session = session
        self.providers = list(session.get_providers())
        if self.settings.providers == "cuda" and CUDA not in self.providers:
            raise RuntimeError("PROVIDERS=cuda but the session fell back to CPU")
        # Warm-up: the first run allocates and optimises; do it before reporting ready.
        warm = np.zeros((meta.input.height, meta.input.width, 3), dtype=np.uint8)
        (first,) = self._per_image([warm])
        output = first[OUTPUT_NAME]
        if output.shape != (len(meta.labels),):
            raise RuntimeError(
                f"model output has shape {(1, *output.shape)}; expected (batch, "
                f"{len(meta.labels)}) to match the labels in model.json"
            )
        score(meta, output)
        if self.gate is not None and first["features"].shape != (meta.gate.feature_dim,):
            raise RuntimeError(f"features output has shape {first['features'].shape}; the "
                               f"gate expects {meta.gate.feature_dim} values")

    # --- running ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def require_ready(self) -> BundleMeta:
        """The bundle's metadata, or ModelNotReady (503 model_not_ready) while loading or
        after a failed load."""
        if not self.ready or self.meta is None:
            reason = self.error or "the model is still loading"
            raise ModelNotReady(f"the model is not ready: {reason}")
        return self.meta

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        assert self._session is not None
        values = self._session.run(self.output_names, {INPUT_NAME: batch})
        return {name: np.asarray(value) for name, value in zip(self.output_names, values,
                                                               strict=True)}

    def _per_image(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        batch = np.ascontiguousarray(np.stack(images).astype(np.uint8, copy=False))
        outputs = self._run(batch)
        return [{name: value[i] for name, value in outputs.items()} for i in range(len(images))]

    def predict_outputs(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run uint8 (H, W, 3) images as one batch (blocking): every output
        (`output_names`) by name, per image."""
        self.require_ready()
        return self._per_image(images)

    def predict(self, images: list[np.ndarray]) -> list[Scored]:
        """Run uint8 (H, W, 3) images through the model as one batch (blocking)."""
        meta = self.require_ready()
        return [score(meta, row[OUTPUT_NAME]) for row in self.predict_outputs(images)]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
