"""The one onnxruntime session factory: the runner, export, bench and tests build
sessions here, so a benchmark times the very options the service serves with.

Importable without FastAPI (export and bench use it); onnxruntime is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import onnxruntime

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ThreadSettings(Protocol):
    """The session fields of service.config.Settings (duck-typed: no pydantic needed)."""

    intra_op_threads: int
    inter_op_threads: int
    intra_op_spinning: bool


class WorkerSettings(Protocol):
    intra_op_threads: int
    model_workers: int


@dataclass(frozen=True)
class SessionThreads:
    """Thread options of a session; the defaults are onnxruntime's own (export, tests)."""

    intra_op: int = 0  # 0: onnxruntime's default
    inter_op: int = 0
    spinning: bool | None = None  # None: onnxruntime's default (spinning allowed)
    # Stop the spinning when a run returns: otherwise the threads go on spinning for tens
    # of ms after it, taking a core from whatever comes next.
    stop_spinning_after_run: bool = False

    @classmethod
    def of(cls, settings: ThreadSettings, workers: int = 1) -> SessionThreads:
        """The service's options: INTRA_OP_THREADS, INTER_OP_THREADS, INTRA_OP_SPINNING;
        with `workers` runs side by side (MODEL_WORKERS), each gets an equal share of
        INTRA_OP_THREADS (of the usable cores when it is 0), at least one."""
        intra_op = settings.intra_op_threads
        if workers > 1:
            intra_op = max(1, (intra_op or usable_cores()) // workers)
        return cls(intra_op, settings.inter_op_threads, settings.intra_op_spinning)

    @classmethod
    def lone_of(cls, settings: ThreadSettings) -> SessionThreads:
        """The options of the service's lone-request session (LONE_REQUEST_SPINNING): its
        threads spin between operators during a run, and stop when it returns."""
        return cls(
            settings.intra_op_threads,
            settings.inter_op_threads,
            spinning=True,
            stop_spinning_after_run=True,
        )


ONNXRUNTIME_DEFAULTS = SessionThreads()


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def model_workers(settings: WorkerSettings, cuda: bool) -> int:
    """How many model runs go side by side (MODEL_WORKERS; 0 = auto). Auto: one on a GPU
    (its own queue runs the kernels), two on the CPU when the model may use two threads
    or more, so that each run has a core (measured on 2 cores: bench/README.md)."""
    if settings.model_workers:
        return settings.model_workers
    if cuda:
        return 1
    return 2 if (settings.intra_op_threads or usable_cores()) >= 2 else 1


def choose_providers(setting: str, available: list[str]) -> list[str]:
    """PROVIDERS (auto, cpu or cuda) -> the providers to ask for, CUDA first when used."""
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


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def make_session(
    path: Path | str,
    threads: SessionThreads = ONNXRUNTIME_DEFAULTS,
    providers: Sequence[str] = (CPU,),
) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the model at `path` (CPU with onnxruntime's default
    threads unless told otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = threads.inter_op
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads.spinning is not None:
        # Spinning intra-op threads burn the cores the decode threads need between operators.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if threads.spinning else "0"
        )
    if threads.stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
