"""POST /predict and POST /predict/batch."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from service import deps
from service.bundle import BundleMeta
from service.deadline import bounded, deadline_from_now
from service.deps import MetricsDep, RunnerDep, SettingsDep
from service.errors import ERROR_CODES, ApiError, image_error
from service.gate import GATE_CODES, GateRefusal
from service.inference import ModelOutput, ModelRunner
from service.preprocessing import ImageError, sniff_format
from service.reports import responses as reports
from service.reports.items import ReportItem
from service.schemas import (
    BatchItem,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    ModelRef,
    Prediction,
)
from service.screening import (
    Judged,
    Prepared,
    explain_unavailable,
    judge,
    prepare,
    refusal_error,
)
from service.security import require_api_key
from service.timing import stage_times
from service.uploads import Upload, parse_form

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

_EXPLAIN = Query(
    False,
    description="Add `heatmap`: the class activation map of the "
    "positive class as a PNG sized to the original image (and `preview` for "
    "DICOM). Needs a format 2 bundle (else 422 `explain_unavailable`).",
)

_GATE_NOTE = (
    "With a format 2 bundle an input gate runs first (GATE_ENABLED): an image that is not "
    "an upright frontal chest X-ray is refused with 422 `not_chest_xray`, "
    "`unsupported_view` or `rotated_image` and a message saying why; see GET /model "
    "`gate`. `explain=true` adds `heatmap` (and `preview` for DICOM)."
)


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


def admitted(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Admission control around a predict route, before its body is read: 503
    model_not_ready, or 503 server_busy when MAX_QUEUE images are in (service.admission).

    For the whole request it pins the model serving now (`request.state.model`: a hot
    reload cannot change it halfway, and its gate judges what it scored) and holds the
    admission ticket (`request.state.ticket`; a batch grows it to its file count).
    """

    @functools.wraps(handler)
    async def route(request: Request, *args: Any, **kwargs: Any) -> Any:
        runner = deps.runner(request)
        request.state.model = runner.require_model()
        with runner.admission.enter() as ticket:
            request.state.ticket = ticket
            return await handler(request, *args, **kwargs)

    return route


def _deadline(request: Request) -> float:
    """The request's deadline, set once its body is in (REQUEST_TIMEOUT_S)."""
    deadline: float | None = getattr(request.state, "deadline", None)
    if deadline is None:
        deadline = request.state.deadline = deadline_from_now(request)
    return deadline


async def _decode(
    request: Request, runner: ModelRunner, data: bytes, explain: bool = False
) -> Prepared:
    """The model input, the gate's image facts, and the DICOM header (no pixels; None for
    JPEG/PNG) for reports, for the model pinned by the request."""
    prepared, _ = await _decode_then_run_if_idle(request, runner, data, explain, run=False)
    return prepared


async def _decode_then_run_if_idle(
    request: Request, runner: ModelRunner, data: bytes, explain: bool, run: bool = True
) -> tuple[Prepared, list[ModelOutput] | None]:
    """`_decode`, and with `run` the model's outputs too when the model was idle
    (ModelRunner.run_if_idle: on the same worker, no hop to the scheduler), else None."""
    model = deps.ready_model(request)
    meta = model.meta
    limits = deps.limits(request)
    metrics = deps.metrics(request)

    spent: list[float] = []  # the decode's seconds, read back on the loop

    def work() -> tuple[Prepared, list[ModelOutput] | None]:
        started = time.perf_counter()
        try:
            prepared = prepare(data, meta, limits, model.gate, explain)
        finally:
            spent.append(time.perf_counter() - started)
            metrics.decode.observe(spent[-1])
        outputs = runner.run_if_idle([prepared.model_input], model) if run else None
        return prepared, outputs

    try:
        return await asyncio.get_running_loop().run_in_executor(runner.executor, work)
    except (ImageError, GateRefusal) as exc:
        # Size, sniffed format and code only: never the bytes, the filename or DICOM tags.
        log.info(
            '{"event": "image_rejected", "code": "%s", "bytes": %d, "format": "%s"}',
            exc.code,
            len(data),
            sniff_format(data) or "unknown",
        )
        if isinstance(exc, GateRefusal):
            raise refusal_error(exc) from None
        raise
    finally:
        stage_times(request.state).decode_ms += sum(spent) * 1000.0


def _judge_all(outputs: list[ModelOutput], prepared: list[Prepared], explain: bool) -> list[Judged]:
    """Blocking: each image judged by the gate of the bundle that produced its outputs."""
    return [
        judge(output.meta, output.gate, output.outputs, item, explain)
        for output, item in zip(outputs, prepared, strict=True)
    ]


async def _infer(
    request: Request,
    runner: ModelRunner,
    prepared: list[Prepared],
    explain: bool = False,
    outputs: list[ModelOutput] | None = None,
) -> tuple[list[Judged], float]:
    """The judged results of `prepared` (the gate, the score, heatmaps) and the model time
    spent on them in ms: the runs (batches) they were part of, each counted once, shared
    with the other requests in those runs. The model runs through the scheduler, unless
    `outputs` says it has run already; each image is judged by the gate of the bundle
    that produced its outputs."""
    metrics = deps.metrics(request)
    if outputs is None:
        outputs = await runner.predict(
            [item.model_input for item in prepared],
            deadline=_deadline(request),
            model=deps.ready_model(request),
        )
    if explain:
        # Heatmaps (PNG encoding) cost CPU: off the event loop, like decoding.
        judged = await asyncio.get_running_loop().run_in_executor(
            runner.executor, _judge_all, outputs, prepared, explain
        )
    else:
        # The gate's distances came with the model run (LoadedModel.run): what is left is
        # a comparison and the score, tens of microseconds an image, cheaper than a hop.
        judged = _judge_all(outputs, prepared, explain)
    times = stage_times(request.state)
    runs = {output.run_id: output.run_ms for output in outputs}
    times.model_ms += sum(runs.values())
    times.queue_ms = max([times.queue_ms, *(output.queue_ms for output in outputs)])
    for item in judged:
        if item.refusal is not None:
            log.info('{"event": "image_rejected", "code": "%s"}', item.refusal.code)
            continue
        assert item.scored is not None
        metrics.images.labels(item.scored.label).inc()
        if item.scored.screen_positive:
            metrics.screen_positive.inc()
    return judged, sum(runs.values())


async def _screen_one(
    request: Request, runner: ModelRunner, data: bytes, explain: bool
) -> tuple[Prepared, Judged, float]:
    """One upload decoded, run and judged: /predict's work, bounded as one (one deadline
    and one disconnect watcher for the whole request)."""
    metrics = deps.metrics(request)
    try:
        image, outputs = await _decode_then_run_if_idle(request, runner, data, explain)
    except ImageError as exc:
        metrics.image_errors.labels(exc.code).inc()
        raise image_error(exc) from None
    except ApiError as exc:
        metrics.image_errors.labels(exc.code).inc()
        raise
    (result,), inference_ms = await _infer(request, runner, [image], explain, outputs)
    return image, result, inference_ms


def _error_of(item: Upload) -> ApiError:
    assert item.error is not None
    return item.error


def _model_ref(meta: BundleMeta) -> ModelRef:
    return ModelRef(name=meta.name, version=meta.version)


def _result_fields(result: Judged, meta: BundleMeta) -> dict[str, Any]:
    """The fields a single prediction and a batch entry share."""
    assert result.scored is not None
    return {**dataclasses.asdict(result.scored), "threshold": meta.threshold, **result.extras}


async def predict(
    request: Request,
    runner: RunnerDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    explain: bool = _EXPLAIN,
) -> Prediction | Response:
    meta = deps.ready_model(request).meta  # pinned by admitted(), which answered 503 if not ready
    answer = reports.negotiate(request, reports.SINGLE_OFFERS)  # 406 before the body too
    if explain and not meta.has_explain_outputs:
        raise explain_unavailable(meta)
    form = await parse_form(request, max_files=1, max_file_bytes=settings.max_file_bytes)
    uploads = form.uploads("file")
    request.state.n_files = len(uploads)
    if not uploads:
        raise ApiError("missing_file", "send the image as multipart/form-data in the field 'file'")
    upload = uploads[0]
    if upload.error is not None:
        metrics.image_errors.labels(upload.error.code).inc()
        raise upload.error
    assert upload.data is not None
    if reports.wants_dicom(answer) and (error := reports.dicom_input_required(upload.data)):
        raise error
    request.state.deadline = deadline_from_now(request)
    image, result, inference_ms = await bounded(
        request, _screen_one(request, runner, upload.data, explain)
    )
    meta = deps.ready_model(request).meta
    if result.refusal is not None:
        metrics.image_errors.labels(result.refusal.code).inc()
        raise refusal_error(result.refusal)
    if answer != reports.JSON:
        return await reports.single_report(
            answer, ReportItem(result.scored, header=image.header), meta
        )
    return Prediction(
        **_result_fields(result, meta),
        model=_model_ref(meta),
        inference_ms=round(inference_ms, 3),
    )


async def predict_batch(
    request: Request,
    runner: RunnerDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    explain: bool = _EXPLAIN,
) -> BatchResponse | Response:
    meta = deps.ready_model(request).meta  # pinned by admitted(), which answered 503 if not ready
    answer = reports.negotiate(request, reports.BATCH_OFFERS)  # 406 before the body too
    if explain and not meta.has_explain_outputs:
        raise explain_unavailable(meta)
    form = await parse_form(
        request, max_files=settings.max_batch_files, max_file_bytes=settings.max_file_bytes
    )
    read = form.uploads("files")
    request.state.n_files = len(read)
    if not read:
        raise ApiError(
            "missing_file",
            "send the images as multipart/form-data, repeating the field 'files'",
        )
    request.state.ticket.grow(len(read))
    request.state.deadline = deadline_from_now(request)

    # One readable file is a lone image like /predict's: run where it is decoded when
    # the model is idle (ModelRunner.run_if_idle).
    lone = sum(item.data is not None for item in read) == 1
    ran: list[ModelOutput] | None = None

    async def decode_one(data: bytes) -> Prepared | ApiError:
        nonlocal ran
        if reports.wants_dicom(answer) and (error := reports.dicom_input_required(data)):
            return error
        try:
            prepared, ran = await _decode_then_run_if_idle(request, runner, data, explain, lone)
            return prepared
        except ImageError as exc:
            return image_error(exc)
        except ApiError as exc:
            return exc

    pending = [decode_one(item.data) for item in read if item.data is not None]
    decoded = iter(await bounded(request, asyncio.gather(*pending)))
    outcomes: list[Prepared | ApiError] = [
        next(decoded) if item.data is not None else _error_of(item) for item in read
    ]
    images = [outcome for outcome in outcomes if isinstance(outcome, Prepared)]
    scored, inference_ms = (
        await bounded(request, _infer(request, runner, images, explain, ran))
        if images
        else ([], 0.0)
    )
    meta = deps.ready_model(request).meta
    scores = iter(scored)
    results: list[BatchItem] = []
    report_items: list[ReportItem] = []
    for item, outcome in zip(read, outcomes, strict=True):
        if isinstance(outcome, ApiError):
            metrics.image_errors.labels(outcome.code).inc()
            results.append(
                BatchItem(
                    filename=item.filename,
                    error=ErrorDetail(code=outcome.code, message=outcome.message),
                )
            )
            report_items.append(ReportItem(error=outcome, filename=item.filename))
            continue
        result = next(scores)
        if result.refusal is not None:
            metrics.image_errors.labels(result.refusal.code).inc()
            refusal = refusal_error(result.refusal)
            results.append(
                BatchItem(
                    filename=item.filename,
                    error=ErrorDetail(code=refusal.code, message=refusal.message),
                )
            )
            report_items.append(ReportItem(error=refusal, filename=item.filename))
            continue
        results.append(BatchItem(filename=item.filename, **_result_fields(result, meta)))
        report_items.append(
            ReportItem(result.scored, header=outcome.header, filename=item.filename)
        )
    if answer != reports.JSON:
        return await reports.batch_report(answer, report_items, meta)
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
        response_model_exclude_none=True,
        summary="Screen one chest X-ray",
        description="Upload one radiograph (JPEG, PNG or DICOM) as multipart/form-data in "
        "the field `file`. The answer is a screening aid, not a diagnosis. " + _GATE_NOTE,
        openapi_extra=_multipart_body("file", _FILE_SCHEMA),
        responses={
            **reports.openapi_responses(batch=False),
            **_errors(
                "empty_file",
                "invalid_image",
                "invalid_multipart",
                "unauthorized",
                "file_too_large",
                "request_too_large",
                "too_many_files",
                "image_too_large",
                "unsupported_media_type",
                "missing_file",
                "image_too_small",
                "model_not_ready",
                "not_acceptable",
                "dicom_input_required",
                "dicom_header_incomplete",
                *GATE_CODES,
                "explain_unavailable",
                "server_busy",
                "deadline_exceeded",
            ),
        },
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
        "requests' images). A screening aid, not a diagnosis. "
        + _GATE_NOTE
        + " In a batch a refused image is that entry's `error`.",
        openapi_extra=_multipart_body(
            "files",
            {
                "type": "array",
                "items": _FILE_SCHEMA,
                "minItems": 1,
                "maxItems": max_batch_files,
                "description": f"1 to {max_batch_files} radiographs, the field repeated once "
                "per file.",
            },
        ),
        responses={
            **reports.openapi_responses(batch=True),
            **_errors(
                "invalid_multipart",
                "unauthorized",
                "request_too_large",
                "too_many_files",
                "missing_file",
                "model_not_ready",
                "not_acceptable",
                "explain_unavailable",
                "server_busy",
                "deadline_exceeded",
            ),
        },
    )
    return router
