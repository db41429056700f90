"""POST /predict and POST /predict/batch."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from service.bundle import BundleMeta
from service.deadline import bounded, deadline_from_now
from service.errors import ERROR_CODES, ApiError, image_error
from service.inference import LoadedModel, ModelRunner, Scored
from service.preprocessing import ImageError, load_model_input, sniff_format
from service.schemas import (
    BatchItem,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    ModelRef,
    Prediction,
)
from service.security import require_api_key
from service.uploads import Upload, files_in, parse_form, read_upload

log = logging.getLogger("pneumoscreen.predict")

def _errors(*codes: str) -> dict[int | str, dict[str, Any]]:
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERROR_CODES[code][0], []).append(code)
    return {
        status: {
            "model": ErrorResponse,
            "description": "; ".join(f"`{c}`: {ERROR_CODES[c][1]}" for c in names),
        }
        for status, names in sorted(by_status.items())
    }


_FILE_SCHEMA = {
    "type": "string",
    "format": "binary",
    "description": "A chest radiograph: JPEG, PNG or DICOM (detected from the content).",
}

def _multipart_body(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its form by hand (service.uploads)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field],
                        "properties": {field: schema},
                    }
                }
            },
        }
    }


def admitted(handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """Admission control around a predict route, before its body is read: 503
    model_not_ready, or 503 server_busy when MAX_QUEUE images are in (service.admission).

    For the whole request it pins the model serving now (`request.state.model`: a hot
    reload cannot change it halfway) and holds the admission ticket (`request.state.ticket`;
    a batch grows it to its file count).
    """

    @functools.wraps(handler)
    async def route(request: Request) -> Any:
        runner: ModelRunner = request.app.state.runner
        request.state.model = runner.require_model()
        with runner.admission.enter() as ticket:
            request.state.ticket = ticket
            return await handler(request)

    return route


def _model(request: Request) -> LoadedModel:
    model: LoadedModel = request.state.model
    return model


async def _decode(request: Request, runner: ModelRunner, data: bytes) -> np.ndarray:
    meta = _model(request).meta
    limits = request.app.state.limits
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        return await loop.run_in_executor(
            runner.executor, load_model_input, data, meta.input.height, meta.input.width, limits
        )
    except ImageError as exc:
        # Size, sniffed format and code only: never the bytes, the filename or DICOM tags.
        log.info('{"event": "image_rejected", "code": "%s", "bytes": %d, "format": "%s"}',
                 exc.code, len(data), sniff_format(data) or "unknown")
        raise
    finally:
        request.app.state.metrics.decode.observe(time.perf_counter() - started)


async def _infer(
    request: Request, runner: ModelRunner, images: list[np.ndarray]
) -> tuple[list[Scored], float]:
    """Scores of `images`, and the model time spent on them in ms: the runs (batches) they
    were part of, each counted once, shared with the other requests in those runs."""
    metrics = request.app.state.metrics
    outputs = await runner.predict(
        images, deadline=request.state.deadline, model=_model(request)
    )
    scored = [output.score() for output in outputs]
    for result in scored:
        metrics.images.labels(result.label).inc()
        if result.screen_positive:
            metrics.screen_positive.inc()
    return scored, sum({output.run_id: output.run_ms for output in outputs}.values())


def _error_of(item: Upload) -> ApiError:
    assert item.error is not None
    return item.error


def _model_ref(meta: BundleMeta) -> ModelRef:
    return ModelRef(name=meta.name, version=meta.version)


def _result_fields(result: Scored, meta: BundleMeta) -> dict[str, Any]:
    """The fields a single prediction and a batch entry share."""
    return {**dataclasses.asdict(result), "threshold": meta.threshold}


async def predict(request: Request) -> Prediction:
    runner: ModelRunner = request.app.state.runner
    runner.require_ready()  # before reading the body: 503 model_not_ready
    settings = request.app.state.settings
    form = await parse_form(request, max_files=1)
    try:
        uploads = files_in(form, "file")
        request.state.n_files = len(uploads)
        if not uploads:
            raise ApiError(422, "missing_file",
                           "send the image as multipart/form-data in the field 'file'")
        upload = await read_upload(uploads[0], settings.max_file_bytes)
    finally:
        await form.close()
    metrics = request.app.state.metrics
    if upload.error is not None:
        metrics.image_errors.labels(upload.error.code).inc()
        raise upload.error
    assert upload.data is not None
    request.state.deadline = deadline_from_now(request)
    try:
        image = await bounded(request, _decode(request, runner, upload.data))
    except ImageError as exc:
        metrics.image_errors.labels(exc.code).inc()
        raise image_error(exc) from None
    (result,), inference_ms = await bounded(request, _infer(request, runner, [image]))
    meta = _model(request).meta
    return Prediction(
        **_result_fields(result, meta),
        model=_model_ref(meta),
        inference_ms=round(inference_ms, 3),
    )


async def predict_batch(request: Request) -> BatchResponse:
    runner: ModelRunner = request.app.state.runner
    runner.require_ready()  # before reading the body: 503 model_not_ready
    settings = request.app.state.settings
    metrics = request.app.state.metrics
    form = await parse_form(request, max_files=settings.max_batch_files)
    try:
        uploads = files_in(form, "files")
        request.state.n_files = len(uploads)
        if not uploads:
            raise ApiError(
                422, "missing_file",
                "send the images as multipart/form-data, repeating the field 'files'",
            )
        request.state.ticket.grow(len(uploads))
        read = [await read_upload(item, settings.max_file_bytes) for item in uploads]
    finally:
        await form.close()
    request.state.deadline = deadline_from_now(request)

    async def decode_one(data: bytes) -> np.ndarray | ApiError:
        try:
            return await _decode(request, runner, data)
        except ImageError as exc:
            return image_error(exc)

    pending = [decode_one(item.data) for item in read if item.data is not None]
    decoded = iter(await bounded(request, asyncio.gather(*pending)))
    outcomes: list[np.ndarray | ApiError] = [
        next(decoded) if item.data is not None else _error_of(item) for item in read
    ]
    images = [outcome for outcome in outcomes if isinstance(outcome, np.ndarray)]
    scored, inference_ms = (
        await bounded(request, _infer(request, runner, images)) if images else ([], 0.0)
    )
    meta = _model(request).meta
    scores = iter(scored)
    results: list[BatchItem] = []
    for item, outcome in zip(read, outcomes, strict=True):
        if isinstance(outcome, ApiError):
            metrics.image_errors.labels(outcome.code).inc()
            results.append(BatchItem(
                filename=item.filename,
                error=ErrorDetail(code=outcome.code, message=outcome.message),
            ))
            continue
        result = next(scores)
        results.append(BatchItem(filename=item.filename, **_result_fields(result, meta)))
    return BatchResponse(
        results=results, model=_model_ref(meta), inference_ms=round(inference_ms, 3)
    )


def build_router(max_batch_files: int) -> APIRouter:
    """The predict routes of one app (the batch limit appears in its OpenAPI)."""
    router = APIRouter(tags=["prediction"], dependencies=[Depends(require_api_key)])
    router.add_api_route(
        "/predict",
        admitted(predict),
        methods=["POST"],
        response_model=Prediction,
        summary="Screen one chest X-ray",
        description="Upload one radiograph (JPEG, PNG or DICOM) as multipart/form-data in "
        "the field `file`. The answer is a screening aid, not a diagnosis.",
        openapi_extra=_multipart_body("file", _FILE_SCHEMA),
        responses=_errors(
            "empty_file", "invalid_image", "invalid_multipart", "unauthorized",
            "file_too_large", "request_too_large", "too_many_files", "image_too_large",
            "unsupported_media_type", "missing_file", "image_too_small", "model_not_ready",
            "server_busy", "deadline_exceeded",
        ),
    )
    router.add_api_route(
        "/predict/batch",
        admitted(predict_batch),
        methods=["POST"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        summary="Screen several chest X-rays in one request",
        description=f"Upload 1 to {max_batch_files} radiographs as multipart/form-data, "
        "repeating the field `files`. Results come back in request order; a file that "
        "cannot be read gets an `error` entry and does not fail the others. The readable "
        "images go to the model together (the scheduler may merge them with other "
        "requests' images). A screening aid, not a diagnosis.",
        openapi_extra=_multipart_body("files", {
            "type": "array",
            "items": _FILE_SCHEMA,
            "minItems": 1,
            "maxItems": max_batch_files,
            "description": f"1 to {max_batch_files} radiographs, the field repeated once "
            "per file.",
        }),
        responses=_errors(
            "invalid_multipart", "unauthorized", "request_too_large", "too_many_files",
            "missing_file", "model_not_ready", "server_busy", "deadline_exceeded",
        ),
    )
    return router
