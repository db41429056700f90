"""Prometheus metrics, in a registry of the app's own (tests create many apps)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The standard process_* (resident memory, CPU seconds, open fds, start time),
        # python_gc_* and python_info series every Prometheus client exports by default;
        # they go on the app's own registry, which does not include the global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "pneumoscreen_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "pneumoscreen_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "pneumoscreen_images_predicted",
            "Images the model scored, by predicted label.",
            ["label"],
            registry=r,
        )
        self.screen_positive = Counter(
            "pneumoscreen_images_screen_positive",
            "Images whose positive probability reached the threshold.",
            registry=r,
        )
        self.image_errors = Counter(
            "pneumoscreen_image_errors",
            "Uploaded files rejected, by error code.",
            ["code"],
            registry=r,
        )
        self.batch_size = Histogram(
            "pneumoscreen_batch_size",
            "Images per model run (the scheduler merges concurrent requests).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "pneumoscreen_inference_duration_seconds",
            "Time of one model run (a whole batch), without decoding.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "pneumoscreen_decode_duration_seconds",
            "Time to decode and resize one image.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Info("pneumoscreen_model", "The served model bundle.", registry=r)
        self.model_ready = Gauge(
            "pneumoscreen_model_ready",
            "1 when the model is loaded and warmed up, else 0.",
            registry=r,
        )
        self.model_workers = Gauge(
            "pneumoscreen_model_workers",
            "Model runs that may go side by side (MODEL_WORKERS, resolved).",
            registry=r,
        )
        self.queued_images = Gauge(
            "pneumoscreen_queued_images",
            "Decoded images waiting for the model (not counting the batch being run).",
            registry=r,
        )
        self.admitted_images = Gauge(
            "pneumoscreen_admitted_images",
            "Images admitted and not yet answered (bounded by MAX_QUEUE).",
            registry=r,
        )
        self.dropped_images = Counter(
            "pneumoscreen_dropped_images",
            "Queued images never run: their client went away (cancelled) or their "
            "deadline passed (deadline).",
            ["reason"],
            registry=r,
        )
        self.reloads = Counter(
            "pneumoscreen_model_reloads",
            "Model loads and reloads, by trigger (startup, admin, sighup) and outcome.",
            ["trigger", "outcome"],
            registry=r,
        )

    def scheduler_hooks(self) -> SchedulerMetrics:
        return SchedulerMetrics(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SchedulerMetrics:
    """service.scheduler's hooks, reported as the metrics above."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def model_run(self, batch_size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(batch_size)
        self.metrics.inference.observe(seconds)

    def dropped(self, reason: str, images: int) -> None:
        self.metrics.dropped_images.labels(reason).inc(images)

    def queue_depth(self, images: int) -> None:
        self.metrics.queued_images.set(images)
