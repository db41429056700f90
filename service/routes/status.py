"""GET /livez, /health, /model and /metrics: open even when API_KEY is set."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import LifecycleDep, MetricsDep, ReadyModelDep, RunnerDep
from service.errors import ERROR_CODES, RETRY_AFTER_SECONDS, error_status
from service.gate import unavailable_card
from service.inference import LoadedModel, ReloadOutcome
from service.metrics import CONTENT_TYPE
from service.schemas import (
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    LivenessResponse,
    ModelInfo,
    ModelRefWithHash,
    ReloadReport,
)

router = APIRouter(tags=["operations"])


def reload_report(outcome: ReloadOutcome | None) -> ReloadReport | None:
    if outcome is None:
        return None
    serving = outcome.serving
    return ReloadReport(
        ok=outcome.ok,
        trigger=outcome.trigger,  # type: ignore[arg-type]
        finished_at=outcome.finished_at,
        duration_ms=round(outcome.duration_ms, 1),
        serving=ModelRefWithHash(
            name=serving.name, version=serving.version, sha256=serving.onnx_sha256
        )
        if serving is not None
        else None,
        error=outcome.error,
    )


@router.get(
    "/livez",
    response_model=LivenessResponse,
    summary="Liveness: the process answers (even while the model loads)",
)
async def livez() -> LivenessResponse:
    return LivenessResponse()


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    summary="Readiness: the model is loaded and a warm-up inference succeeded",
    responses={
        503: {
            "model": HealthResponse,
            "description": "The model is still loading (`status: loading`), failed to "
            "load (`status: failed`, with the reason in `error`), or the server is shutting "
            "down (`status: draining`: in-flight requests finish, send new ones elsewhere).",
            "content": {
                "application/json": {
                    "example": {
                        "status": "failed",
                        "providers": [],
                        "error": {
                            "code": "model_load_failed",
                            "message": "no model bundle in models/default: expected model.json and "
                            "model.onnx. ...",
                        },
                    }
                }
            },
        }
    },
)
async def health(runner: RunnerDep, lifecycle: LifecycleDep) -> HealthResponse | JSONResponse:
    serving = runner.model  # one snapshot: a reload may swap the model meanwhile
    meta = serving.meta if serving is not None else None
    model = (
        ModelRefWithHash(name=meta.name, version=meta.version, sha256=meta.onnx_sha256)
        if meta is not None
        else None
    )
    last_reload = reload_report(runner.last_reload)
    if lifecycle.draining:
        return _not_ready(
            HealthResponse(
                status="draining",
                model=model,
                providers=runner.providers,
                error=ErrorDetail(
                    code="draining",
                    message="the server is shutting down; "
                    "requests in flight are finishing, send new ones elsewhere",
                ),
                last_reload=last_reload,
                gate=_gate_status(serving),
                heatmaps=_heatmaps(serving),
            )
        )
    if runner.ready and model is not None:
        return HealthResponse(
            status="ok",
            model=model,
            providers=runner.providers,
            last_reload=last_reload,
            gate=_gate_status(serving),
            heatmaps=_heatmaps(serving),
        )
    if runner.state == "failed":
        return _not_ready(
            HealthResponse(
                status="failed",
                error=ErrorDetail(
                    code="model_load_failed", message=runner.error or "unknown error"
                ),
                last_reload=last_reload,
            )
        )
    return _not_ready(
        HealthResponse(
            status="loading",
            error=ErrorDetail(code="model_loading", message="the model is still loading"),
            last_reload=last_reload,
        )
    )


def _not_ready(body: HealthResponse) -> JSONResponse:
    # The same status as the API's model_not_ready, so a load balancer reads both alike.
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=error_status("model_not_ready"),
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="The served model: labels, threshold, input size, validation metrics, intended use",
    responses={
        error_status("model_not_ready"): {
            "model": ErrorResponse,
            "description": ERROR_CODES["model_not_ready"][1],
        }
    },
)
async def model_info(runner: RunnerDep, model: ReadyModelDep) -> ModelInfo:
    meta = model.meta
    shared = set(ModelInfo.model_fields) & set(type(meta).model_fields) - {"gate"}
    return ModelInfo(
        **meta.model_dump(include=shared),
        sha256=meta.onnx_sha256,
        providers=list(model.providers),
        last_reload=reload_report(runner.last_reload),
        gate=model.gate.card() if model.gate is not None else unavailable_card(meta),
        heatmaps="available" if meta.has_explain_outputs else "unavailable",
    )


def _gate_status(model: LoadedModel | None) -> Literal["on", "off", "unavailable"] | None:
    """/health's account of the serving bundle's gate (none before a load)."""
    if model is None:
        return None
    if model.gate is None:
        return "unavailable"
    return "on" if model.gate.enabled else "off"


def _heatmaps(model: LoadedModel | None) -> Literal["available", "unavailable"] | None:
    """/health's account of the serving bundle's heatmaps (none before a load)."""
    if model is None:
        return None
    return "available" if model.meta.has_explain_outputs else "unavailable"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format.",
        }
    },
)
async def metrics(registry: MetricsDep) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE)
