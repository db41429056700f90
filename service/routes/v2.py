"""The Open Inference Protocol v2 (KServe / Triton REST) beside our own routes.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          liveness, readiness
    GET  /v2/models/{name}[/versions/{version}]     model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready
    POST /v2/models/{name}[/versions/{version}]/infer

`name` is the bundle's `name`, `version` its `version`. Inference goes through the very
functions /predict/batch calls (service.routes.predict: decoding, limits, metrics and
the model run), so both routes always give the same probabilities. Errors here have the
protocol's shape, {"error": "<message>"}, not our {"error": {"code", "message"}}.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service import deps
from service import open_inference as oip
from service.admission import BUSY_RETRY_AFTER_SECONDS, ServerBusy
from service.bundle import BundleMeta
from service.deadline import bounded, deadline_from_now
from service.deps import RunnerDep
from service.errors import (
    ERROR_CODES,
    RETRY_AFTER_SECONDS,
    ApiError,
    deadline_message,
    error_status,
    image_error,
)
from service.inference import ModelNotReady
from service.preprocessing import ImageError
from service.routes.predict import _decode, _infer, admitted
from service.scheduler import DeadlineExceeded
from service.screening import refusal_error
from service.security import require_api_key

log = logging.getLogger("pneumoscreen.v2")

PREFIX = "/v2"
SERVER_NAME = "pneumoscreen"


def protocol_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _as_protocol_error(request: Request, exc: Exception) -> Response | None:
    """Our exceptions in the protocol's error shape; None for a server bug."""
    if isinstance(exc, oip.ProtocolError):
        return protocol_error(exc.status, exc.message)
    if isinstance(exc, ApiError):
        return protocol_error(exc.status_code, exc.message, exc.headers)
    if isinstance(exc, ImageError):
        api = image_error(exc)
        return protocol_error(api.status_code, api.message)
    if isinstance(exc, ModelNotReady):
        return protocol_error(
            error_status("model_not_ready"), str(exc), {"Retry-After": str(RETRY_AFTER_SECONDS)}
        )
    if isinstance(exc, ServerBusy):  # admission (MAX_QUEUE), as on /predict
        return protocol_error(
            error_status("server_busy"), str(exc), {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}
        )
    if isinstance(exc, DeadlineExceeded):
        return protocol_error(error_status("deadline_exceeded"), deadline_message(request))
    if isinstance(exc, StarletteHTTPException):
        return protocol_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    if isinstance(exc, RequestValidationError):
        return protocol_error(400, "the request does not match the protocol")
    return None


class ProtocolRoute(APIRoute):
    """Answers every error of its endpoint (dependencies included) as {"error": "..."}."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every error gets the protocol's shape
                answer = _as_protocol_error(request, exc)
                if answer is None:
                    log.exception("unexpected error on %s", request.url.path)
                    return protocol_error(500, "unexpected server error; see the server log")
                return answer

        return protocol_handler


def _model(request: Request, name: str, version: str | None) -> BundleMeta:
    """The served model if `name` (and `version`) are its own: 404 otherwise."""
    pinned = getattr(request.state, "model", None)  # infer: the model admitted() pinned
    meta = pinned.meta if pinned is not None else deps.runner(request).require_ready()
    if name != meta.name:
        raise oip.ProtocolError(f"unknown model '{name}'; this server serves '{meta.name}'", 404)
    if version is not None and version != meta.version:
        raise oip.ProtocolError(
            f"unknown version '{version}' of model '{name}'; the served version is "
            f"'{meta.version}'",
            404,
        )
    return meta


async def server_metadata(request: Request) -> dict[str, Any]:
    return {
        "name": SERVER_NAME,
        "version": request.app.version,
        "extensions": list(oip.EXTENSIONS),
    }


async def server_live() -> dict[str, bool]:
    return {"live": True}


async def server_ready(runner: RunnerDep) -> Response:
    ready = runner.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    meta = _model(request, name, None)
    return oip.model_metadata(meta.name, meta.version, len(meta.labels))


async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    meta = _model(request, name, version)
    return oip.model_metadata(meta.name, meta.version, len(meta.labels))


def _ready(request: Request, name: str, version: str | None) -> Response:
    if not deps.runner(request).ready:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    _model(request, name, version)
    return JSONResponse({"name": name, "ready": True})


async def model_ready(request: Request, name: str) -> Response:
    return _ready(request, name, None)


async def version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(request, name, version)


async def _body(request: Request) -> bytes:
    """The request body; gzip or deflate bodies (tritonclient's request compression) are
    inflated, never past MAX_REQUEST_BYTES (a compressed body must not be a bomb)."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise oip.ProtocolError(f"unsupported Content-Encoding '{encoding}'", 415)
    limit = deps.settings(request).max_request_bytes
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise oip.ProtocolError(f"the {encoding} body cannot be decompressed") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise oip.ProtocolError(
            f"the decompressed body is larger than the limit of {limit:,} bytes", 413
        )
    return inflated


async def model_infer(request: Request, name: str) -> Response:
    return await _infer_v2(request, name, None)


async def version_infer(request: Request, name: str, version: str) -> Response:
    return await _infer_v2(request, name, version)


def _element_error(index: int, api: ApiError) -> oip.ProtocolError:
    """The whole request fails (the protocol has no per-element errors); the element and
    our stable code say which file and why."""
    return oip.ProtocolError(
        f"input '{oip.INPUT}' element {index}: {api.code}: {api.message}", api.status_code
    )


async def _infer_v2(request: Request, name: str, version: str | None) -> Response:
    meta = _model(request, name, version)
    runner = deps.runner(request)
    settings = deps.settings(request)
    parsed = oip.parse_infer_request(
        await _body(request),
        request.headers.get(oip.HEADER_LENGTH),
        max_items=settings.max_batch_files,
        max_item_bytes=settings.max_file_bytes,
    )
    request.state.n_files = len(parsed.images)
    request.state.ticket.grow(len(parsed.images))  # admitted() counted one image so far
    request.state.deadline = deadline_from_now(request)
    metrics = deps.metrics(request)
    decoded = await bounded(
        request,
        asyncio.gather(
            *(_decode(request, runner, data) for data in parsed.images), return_exceptions=True
        ),
    )
    for index, outcome in enumerate(decoded):
        if isinstance(outcome, ImageError | ApiError):
            api = image_error(outcome) if isinstance(outcome, ImageError) else outcome
            metrics.image_errors.labels(api.code).inc()
            raise _element_error(index, api)
        if isinstance(outcome, BaseException):
            raise outcome
    images = [outcome for outcome in decoded if not isinstance(outcome, BaseException)]
    judged, _ = await bounded(request, _infer(request, runner, images))
    for index, result in enumerate(judged):
        if result.refusal is not None:  # the input gate: not a chest X-ray, rotated, ...
            metrics.image_errors.labels(result.refusal.code).inc()
            raise _element_error(index, refusal_error(result.refusal))
    scored = [result.scored for result in judged if result.scored is not None]
    tensors = oip.output_tensors(
        meta.labels,
        [result.probabilities for result in scored],
        [result.label for result in scored],
        [result.screen_positive for result in scored],
    )
    body, header_length = oip.encode_infer_response(
        meta.name,
        meta.version,
        parsed,
        tensors,
        parameters={"labels": ",".join(meta.labels), "threshold": meta.threshold},
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(header_length)}
    )


def _unknown_route(router: APIRouter) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def unknown_route(request: Request) -> Response:
        """Unknown /v2 paths, and known ones with the wrong method, in the protocol's
        shape (this catch-all comes last, so it also sees what would be a 405)."""
        for route in router.routes:
            if isinstance(route, ProtocolRoute) and route.endpoint is not unknown_route:
                match, _ = route.matches(request.scope)
                if match == Match.PARTIAL:
                    return protocol_error(405, "method not allowed on this route")
        return protocol_error(404, "no such route of the inference protocol")

    return unknown_route


_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _errors(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for status, text in pairs
    }


_NOT_READY = ERROR_CODES["model_not_ready"]
_UNKNOWN_MODEL = (404, "No model of this name (the bundle's `name`) or version.")


_INFER_DESCRIPTION = (
    "Input `image` BYTES [N]: encoded JPEG/PNG/DICOM files (base64 strings in JSON "
    "tensors, raw with the binary tensor data extension). Outputs `probabilities` FP32 "
    "[N, n_labels] (label order in the response's `parameters.labels`), `label` BYTES "
    "[N], `screen_positive` BOOL [N]. Same preprocessing and limits as /predict/batch. "
    'Needs `X-API-Key` when the server sets API_KEY. Errors: {"error": "..."}.'
)
_INFER_ERRORS = _errors(
    (400, "The request breaks the protocol, or an image cannot be decoded."),
    ERROR_CODES["unauthorized"],
    _UNKNOWN_MODEL,
    (413, "Too many images (MAX_BATCH_FILES), or a file or image too large."),
    (415, "An element is not JPEG, PNG or DICOM (or a Content-Encoding we do not read)."),
    (422, "An image is too small (MIN_IMAGE_SIDE)."),
    (
        error_status("model_not_ready"),
        f"{ERROR_CODES['model_not_ready'][1]} Or: {ERROR_CODES['server_busy'][1]}",
    ),
    ERROR_CODES["deadline_exceeded"],
)
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "42",
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": ["<the file, base64>"],
                        }
                    ],
                },
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "Binary tensor data extension: the JSON request, then the "
                    "tensors' bytes; header Inference-Header-Content-Length gives the "
                    "JSON's length.",
                }
            },
        },
    }
}


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["open inference protocol"], route_class=ProtocolRoute)
    router.add_api_route("", server_metadata, methods=["GET"], summary="Server metadata")
    router.add_api_route("/health/live", server_live, methods=["GET"], summary="Server live")
    router.add_api_route(
        "/health/ready",
        server_ready,
        methods=["GET"],
        summary="Server ready (503 while the model loads)",
    )
    routes = (
        ("/models/{name}", model_metadata, model_ready, model_infer),
        ("/models/{name}/versions/{version}", version_metadata, version_ready, version_infer),
    )
    for base, metadata, ready, infer in routes:
        router.add_api_route(
            base,
            metadata,
            methods=["GET"],
            summary="Model metadata",
            responses=_errors(_UNKNOWN_MODEL, _NOT_READY),
        )
        router.add_api_route(
            base + "/ready",
            ready,
            methods=["GET"],
            summary="Model ready",
            responses=_errors(_UNKNOWN_MODEL),
        )
        router.add_api_route(
            base + "/infer",
            admitted(infer),
            methods=["POST"],
            summary="Infer (JSON or binary tensors)",
            description=_INFER_DESCRIPTION,
            dependencies=[Depends(require_api_key)],
            responses=_INFER_ERRORS,
            openapi_extra=_INFER_BODY,
        )
    router.add_api_route(
        "/{path:path}",
        _unknown_route(router),
        include_in_schema=False,
        methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    )
    return router
