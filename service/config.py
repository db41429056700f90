"""Service configuration: one Settings class, read from environment variables.

Names are the field names in upper case, without a prefix (`MODEL_DIR`, `API_KEY`, ...);
matching is case-insensitive. docs/api.md has the same table for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import allocator
from service.decode_budget import DecodeMemoryBudget
from service.preprocessing import SUPPORTED_FORMATS, DecodeLimits

MB = 1024 * 1024

# uvicorn's log levels; `trace` is uvicorn's most verbose, the app itself logs at debug then.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", protected_namespaces=()
    )

    model_dir: Path = Field(
        Path("models/default"),
        description="Folder of the model bundle to serve (model.onnx + model.json).",
    )
    host: str = Field("127.0.0.1", description="Interface to bind (`pneumoscreen serve`).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port (`pneumoscreen serve`).")
    workers: int = Field(
        1, ge=1, description="Worker processes (`pneumoscreen serve`); each loads the model."
    )
    log_level: str = Field(
        "info", description=f"Log level: {', '.join(LOG_LEVELS)} (trace: uvicorn only)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, /predict and /predict/batch need this value in header "
        "`X-API-Key`; health, liveness, model, metrics and docs stay open.",
    )
    max_file_bytes: int = Field(
        25 * MB, ge=1, description="Largest accepted image file, in bytes (413 file_too_large)."
    )
    max_request_bytes: int = Field(
        100 * MB,
        ge=1,
        description="Largest accepted request body, in bytes; checked on Content-Length "
        "and while the body streams in (413 request_too_large).",
    )
    max_batch_files: int = Field(
        32, ge=1, description="Most files in one /predict/batch request (413 too_many_files)."
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest accepted image in pixels (width x height), checked before "
        "decoding (413 image_too_large).",
    )
    min_image_side: int = Field(
        32, ge=1, description="Smallest accepted image side in pixels (422 image_too_small)."
    )
    allowed_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["jpeg", "png", "dicom"],
        description="Accepted image formats, comma-separated, from jpeg, png, dicom "
        "(detected from the bytes, never from the filename; 415 otherwise).",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads of the model in all (0 = onnxruntime's "
        "default, one per core); MODEL_WORKERS runs side by side share them.",
    )
    model_workers: int = Field(
        0,
        ge=0,
        description="Model runs side by side (0 = auto: 2 on the CPU when the model has 2 "
        "or more threads, else 1; 1 with CUDA). Each run gets INTRA_OP_THREADS / "
        "MODEL_WORKERS of the threads: under load two runs on one core each keep both "
        "cores busy (bench/README.md); a lone image still runs on all of them "
        "(LONE_REQUEST_SPINNING).",
    )
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads.")
    inference_threads: int = Field(
        4,
        ge=1,
        description="Threads that decode and preprocess images, off the event loop (the model "
        "itself runs on the scheduler's MODEL_WORKERS threads, see MAX_BATCH_SIZE).",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="onnxruntime execution providers: auto (CUDA when available, else CPU), "
        "cpu, or cuda (fail if CUDA is not available).",
    )
    # --- serving engine: admission, batching, deadlines (service/scheduler.py) ----------
    max_queue: int = Field(
        32,
        ge=1,
        description="Most images admitted at once (being read, decoded, waiting for or in "
        "the model); a request arriving when this many are in is refused at once with 503 "
        "server_busy and Retry-After.",
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        description="Most images in one model run; the scheduler merges queued images from "
        "concurrent requests up to this many (8: with two MODEL_WORKERS, 16 images in the "
        "model at once, as fast under load as 16 a run and about 190 MB less RSS: "
        "bench/README.md).",
    )
    max_batch_wait_ms: float = Field(
        0,
        ge=0,
        description="How long the scheduler may wait after the oldest queued image for a "
        "batch to fill (0: run what is queued as soon as the model is free).",
    )
    request_timeout_s: float = Field(
        30,
        gt=0,
        description="Longest time a request may take once its body is in (decoding, waiting "
        "for and running the model); then 504 deadline_exceeded and its queued images are "
        "dropped.",
    )
    drain_timeout_s: float = Field(
        20,
        ge=0,
        description="After SIGTERM, how long in-flight requests get to finish while /health "
        "answers 503 draining (`pneumoscreen serve`); then the process exits with code 0.",
    )
    # --- HTTP hardening (`pneumoscreen serve`, service/http_protocol.py) ---------------
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="Largest request head (request line and headers) in bytes; larger: 431 "
        "headers_too_large and the connection is closed (`pneumoscreen serve`).",
    )
    max_headers: int = Field(
        100,
        ge=1,
        description="Most header fields in one request; more: 431 headers_too_large "
        "(`pneumoscreen serve`).",
    )
    header_timeout_s: float = Field(
        10,
        gt=0,
        description="Longest time from a connection opening (or a new request starting on "
        "it) to the end of the request's headers; then 408 and the connection is closed "
        "(`pneumoscreen serve`).",
    )
    body_timeout_s: float = Field(
        60,
        gt=0,
        description="Longest time for a request body to arrive once its headers are in; then "
        "408 request_timeout and the connection is closed (`pneumoscreen serve`).",
    )
    keep_alive_timeout_s: float = Field(
        5,
        gt=0,
        description="How long an idle keep-alive connection stays open between requests "
        "(`pneumoscreen serve`).",
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Most open connections; one more is answered 503 server_busy and closed "
        "(`pneumoscreen serve`).",
    )
    intra_op_spinning: bool = Field(
        False,
        description="Let onnxruntime's intra-op threads spin-wait between operators (a little "
        "faster on otherwise idle cores; off because the decode threads share the cores).",
    )
    lone_request_spinning: bool = Field(
        True,
        description="On the CPU, run a lone image (the model idle, nothing queued) on a second "
        "session of the model whose intra-op threads spin between operators during the run "
        "and stop when it returns: faster at batch 1 on idle cores (bench/README.md), for "
        "about 45 MB more memory; batches under load keep INTRA_OP_SPINNING.",
    )
    max_decoded_bytes: int = Field(
        64 * MB,
        ge=1,
        description="Largest accepted decoded image, in bytes (width x height x samples x "
        "bytes per sample, from the header before decoding; also the cap on an inflated "
        "Deflated DICOM, plus 1 MiB for its other elements) (413 image_too_large).",
    )
    max_jpeg_scans: int = Field(
        32,
        ge=1,
        description="Most scans in a JPEG (progressive JPEGs from real encoders have about "
        "10; each scan passes over the whole image) (422 image_too_complex).",
    )
    decode_memory_budget_bytes: int = Field(
        512 * MB,
        ge=1,
        description="Memory all concurrent decodes of one worker process may hold "
        "together, in bytes, by their estimated peak; a decode waits for its share "
        "(503 server_busy after DECODE_BUDGET_WAIT_S).",
    )
    decode_budget_wait_s: float = Field(
        5.0,
        ge=0,
        description="Seconds a decode waits for its share of DECODE_MEMORY_BUDGET_BYTES "
        "before the image is answered 503 server_busy (with Retry-After).",
    )
    gate_enabled: bool = Field(
        True,
        description="Input gate on (422 not_chest_xray, unsupported_view, rotated_image "
        "before scoring) for bundles that carry one (format 2); false scores every "
        "decodable image as format 1 bundles are.",
    )

    @field_validator("allowed_types", mode="before")
    @classmethod
    def _split_types(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.replace(";", ",").split(",")]
        if isinstance(value, (list, tuple, set, frozenset)):
            names = [str(part).strip().lower() for part in value if str(part).strip()]
            names = ["jpeg" if name == "jpg" else name for name in names]
            unknown = sorted(set(names) - SUPPORTED_FORMATS)
            if unknown:
                raise ValueError(
                    f"unknown image types {unknown}; choose from {sorted(SUPPORTED_FORMATS)}"
                )
            if not names:
                raise ValueError("allowed_types must name at least one image type")
            return list(dict.fromkeys(names))
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # API_KEY= (empty) in a .env or compose file means "no key", not "the empty key".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return value

    def decode_limits(self) -> DecodeLimits:
        """The limits of one app, with a new decode memory budget shared by its decodes."""
        return DecodeLimits(
            max_pixels=self.max_pixels,
            min_side=self.min_image_side,
            allowed_formats=frozenset(self.allowed_types),
            max_decoded_bytes=self.max_decoded_bytes,
            max_jpeg_scans=self.max_jpeg_scans,
            memory=DecodeMemoryBudget(
                self.decode_memory_budget_bytes,
                self.decode_budget_wait_s,
                on_large_release=allocator.trim,
            ),
        )
