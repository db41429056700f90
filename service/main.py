"""The HTTP service: `create_app` builds one FastAPI app around one model bundle.

    uvicorn service.main:create_app --factory      (or: pneumoscreen serve)

The model loads in a worker thread at start-up, so /livez answers at once and /health
turns 200 when the model is verified, loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import allocator, blas
from service.config import Settings
from service.docs import install_openapi, install_swagger_ui
from service.errors import install_error_handlers
from service.inference import ModelRunner
from service.lifecycle import Lifecycle, install_reload_signal
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.routes import admin, predict, status, v2
from service.ui import install_ui

log = logging.getLogger("pneumoscreen")

DESCRIPTION = """\
**Pediatric chest X-ray pneumonia screening aid.**

> **This is a screening aid, not a diagnosis.** It flags radiographs likely to show
> pneumonia for priority review by a clinician. It does not replace a radiologist's or
> clinician's reading, and must not be used on its own to decide on treatment.

Upload a radiograph (JPEG, PNG or DICOM; the format is detected from the file's content)
to `POST /predict`, or several to `POST /predict/batch`. Every error answers
`{"error": {"code": "...", "message": "..."}}` with a stable `code`.

When the server sets `API_KEY`, the predict routes need it in the `X-API-Key` header
(use **Authorize** above); health, model, metrics and docs stay open.
"""

TAGS = [
    {"name": "prediction", "description": "Screen radiographs. Not a diagnosis."},
    {"name": "operations", "description": "Liveness, readiness, model card and metrics."},
    {
        "name": "open inference protocol",
        "description": "KServe / Triton Open Inference Protocol v2 (REST), for their clients: "
        'see docs/integration.md. Errors here are {"error": "..."}.',
    },
]


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("pneumoscreen")
    # "trace" is uvicorn's own level below debug; the app's most verbose is debug.
    numeric = logging.DEBUG if level == "trace" else logging.getLevelName(level.upper())
    logger.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    allocator.tune()  # large decodes give their memory back (service/allocator.py)
    blas.use_one_thread()  # BLAS threads would spin on the model's cores (service/blas.py)
    metrics = Metrics()
    runner = ModelRunner(settings, metrics)
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("loading model bundle from %s", settings.model_dir)
        loop = asyncio.get_running_loop()
        app.state.load_task = loop.run_in_executor(runner.executor, runner.load)
        remove_hup = install_reload_signal(loop, lambda: runner.start_reload("sighup"))
        try:
            yield
        finally:
            remove_hup()
            runner.close()

    app = FastAPI(
        title="pneumoscreen",
        summary="Pediatric chest X-ray pneumonia screening aid (not a diagnosis).",
        description=DESCRIPTION,
        version=_version(),
        openapi_tags=TAGS,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        license_info={"name": "Apache-2.0"},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runner = runner
    app.state.lifecycle = lifecycle
    app.state.limits = settings.decode_limits()
    metrics.model_ready.set(0)

    install_error_handlers(app)
    known_paths: set[str] = set()
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        max_request_bytes=settings.max_request_bytes,
        known_paths=known_paths,
    )
    routers = [
        predict.build_router(settings.max_batch_files),
        status.router,
        admin.router,
        v2.build_router(),
    ]
    for router in routers:
        app.include_router(router)
    install_swagger_ui(app)
    install_ui(app)
    install_openapi(app)
    known_paths.update(
        route.path for router in routers for route in router.routes if hasattr(route, "path")
    )
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pneumoscreen")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "0.1.0"
