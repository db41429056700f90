"""GET /livez, /health, /model and /metrics: open even when API_KEY is set."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.errors import ERROR_CODES, RETRY_AFTER_SECONDS
from service.gate import unavailable_card
from service.inference import ModelRunner
from service.metrics import CONTENT_TYPE
from service.schemas import (
    ErrorResponse,
    HealthResponse,
    LivenessResponse,
    ModelInfo,
    ModelRefWithHash,
)

router = APIRouter(tags=["operations"])


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
            "description": "The model is still loading (`status: loading`) or failed to "
            "load (`status: failed`, with the reason in `error`).",
            "content": {"application/json": {"example": {
                "status": "failed",
                "providers": [],
                "error": {
                    "code": "model_load_failed",
                    "message": "no model bundle in models/default: expected model.json and "
                    "model.onnx. ...",
                },
            }}},
        }
    },
)
async def health(request: Request) -> HealthResponse | JSONResponse:
    runner: ModelRunner = request.app.state.runner
    if runner.ready and runner.meta is not None:
        meta = runner.meta
        return HealthResponse(
            status="ok",
            model=ModelRefWithHash(name=meta.name, version=meta.version, sha256=meta.onnx_sha256),
            providers=runner.providers,
            gate=_gate_status(runner),
            heatmaps="available" if meta.has_explain_outputs else "unavailable",
        )
    if runner.state == "failed":
        body = {
            "status": "failed",
            "providers": [],
            "error": {"code": "model_load_failed", "message": runner.error or "unknown error"},
        }
    else:
        body = {
            "status": "loading",
            "providers": [],
            "error": {"code": "model_loading", "message": "the model is still loading"},
        }
    return JSONResponse(
        body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="The served model: labels, threshold, input size, validation metrics, intended use",
    responses={503: {"model": ErrorResponse, "description": ERROR_CODES["model_not_ready"][1]}},
)
async def model_info(request: Request) -> ModelInfo:
    runner: ModelRunner = request.app.state.runner
    meta = runner.require_ready()
    shared = set(ModelInfo.model_fields) & set(type(meta).model_fields) - {"gate"}
    return ModelInfo(
        **meta.model_dump(include=shared),
        sha256=meta.onnx_sha256,
        providers=runner.providers,
        gate=runner.gate.card() if runner.gate is not None else unavailable_card(meta),
        heatmaps="available" if meta.has_explain_outputs else "unavailable",
    )


def _gate_status(runner: ModelRunner) -> str:
    if runner.gate is None:
        return "unavailable"
    return "on" if runner.gate.enabled else "off"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
