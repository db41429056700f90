"""One error shape for every failure: {"error": {"code": "...", "message": "..."}}.

Codes are stable and machine-readable; messages are for people and never contain image
bytes, patient data or tracebacks.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import deps
from service.admission import BUSY_RETRY_AFTER_SECONDS, ServerBusy
from service.inference import ModelNotReady, ReloadInProgress
from service.preprocessing import ImageError
from service.safe_text import redact
from service.scheduler import DeadlineExceeded

log = logging.getLogger("pneumoscreen.errors")

# Every code the API can answer with, its status and when. docs/api.md mirrors this.
ERROR_CODES: dict[str, tuple[int, str]] = {
    "empty_file": (400, "The uploaded file is empty."),
    "invalid_image": (400, "The file looks like JPEG/PNG/DICOM but cannot be decoded."),
    "invalid_multipart": (400, "The multipart/form-data body is malformed."),
    "unauthorized": (401, "API_KEY is set and X-API-Key is missing or wrong."),
    "not_found": (404, "No such route."),
    "method_not_allowed": (405, "The route exists but not with this HTTP method."),
    "file_too_large": (413, "One file is larger than MAX_FILE_BYTES."),
    "request_too_large": (413, "The request body is larger than MAX_REQUEST_BYTES."),
    "too_many_files": (413, "A batch has more than MAX_BATCH_FILES files."),
    "image_too_large": (413, "Over MAX_PIXELS pixels, or decodes to over MAX_DECODED_BYTES."),
    "unsupported_media_type": (415, "Not a JPEG, PNG or DICOM (or not in ALLOWED_TYPES)."),
    "missing_file": (422, "No file in the form field `file` (or `files` for a batch)."),
    "image_too_small": (422, "An image side is shorter than MIN_IMAGE_SIDE."),
    "validation_error": (422, "The request does not match the documented schema."),
    "not_chest_xray": (422, "The input gate judged the image not a chest X-ray; not scored."),
    "unsupported_view": (422, "DICOM ViewPosition is lateral or oblique; frontal only."),
    "rotated_image": (422, "The X-ray looks rotated by 90, 180 or 270 degrees; not scored."),
    "explain_unavailable": (422, "explain=true, but the bundle (format 1) has no heatmap output."),
    "internal_error": (500, "An unexpected server error; details are in the server log."),
    "model_not_ready": (503, "The model is still loading, or failed to load (see /health)."),
    # The serving engine (service/admission.py, scheduler.py, http_protocol.py, admin).
    "server_busy": (
        503,
        (
            "MAX_QUEUE images (or MAX_CONNECTIONS connections) are already in, or no decode "
            "memory came free within DECODE_BUDGET_WAIT_S; retry after Retry-After seconds."
        ),
    ),
    "deadline_exceeded": (
        504,
        (
            "Not answered within REQUEST_TIMEOUT_S of the body arriving; "
            "its queued work was dropped."
        ),
    ),
    "client_disconnected": (
        499,
        (
            "The client went away before the answer; its queued images "
            "were dropped (logged and counted only: nobody receives it)."
        ),
    ),
    "invalid_http": (
        400,
        ("Malformed HTTP; answered by the server, never by the app, and the connection is closed."),
    ),
    "request_timeout": (
        408,
        (
            "Headers not in within HEADER_TIMEOUT_S, or the body not within "
            "BODY_TIMEOUT_S; the connection is closed."
        ),
    ),
    "headers_too_large": (
        431,
        ("The request head is over MAX_HEADER_BYTES, or has more than MAX_HEADERS fields."),
    ),
    "admin_disabled": (403, "Admin routes need API_KEY to be set on the server."),
    "reload_in_progress": (409, "A model load or reload is already running."),
    "reload_failed": (
        422,
        (
            "The new bundle could not be loaded or warmed up; the old one keeps "
            "serving (the reason is in the message and in /health)."
        ),
    ),
    "not_acceptable": (406, "The Accept header names no media type this route answers with."),
    "dicom_input_required": (422, "A DICOM SR (Accept: application/dicom) needs a DICOM input."),
    "dicom_header_incomplete": (
        422,
        "The DICOM input lacks identifiers a DICOM SR must copy (study, series, instance).",
    ),
    "image_too_complex": (422, "A JPEG with more than MAX_JPEG_SCANS scans."),
}


def error_status(code: str) -> int:
    """The HTTP status of an error code: ERROR_CODES is the only place it is written, so
    call sites name the code only (an unknown code is a KeyError, i.e. a bug)."""
    return ERROR_CODES[code][0]


def _image_error_codes() -> set[str]:
    """The codes of ImageError and all its subclasses (service/preprocessing.py)."""
    codes, pending = set(), [ImageError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return codes


# ImageError.code -> HTTP status, from ERROR_CODES (a code missing there fails at import).
IMAGE_ERROR_STATUS: dict[str, int] = {
    code: ERROR_CODES[code][0] for code in sorted(_image_error_codes())
}


class ApiError(Exception):
    """An error the API answers with on purpose; its status is the code's in ERROR_CODES."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = error_status(code)
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    # The last guard: no object repr, address, path or traceback text in any answer.
    return {"error": {"code": code, "message": redact(message)}}


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=error_status(code), headers=headers)


# When to try again after 503 server_busy because the decode memory budget was taken (a
# decode takes longer to give its memory back than the model takes to free a queue slot,
# whose refusal says BUSY_RETRY_AFTER_SECONDS).
DECODE_BUSY_RETRY_AFTER_SECONDS = 2


def image_error(exc: ImageError) -> ApiError:
    busy = IMAGE_ERROR_STATUS[exc.code] == 503
    headers = {"Retry-After": str(DECODE_BUSY_RETRY_AFTER_SECONDS)} if busy else None
    return ApiError(exc.code, exc.message, headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "model_not_ready",
}


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, exc.headers)


async def _image_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    api = image_error(exc)
    return error_response(api.code, api.message, api.headers)


# How long a client should wait before asking again while the model is not ready.
RETRY_AFTER_SECONDS = 5


async def _model_not_ready(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelNotReady)
    return error_response(
        "model_not_ready", str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


async def _server_busy(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServerBusy)
    return error_response(
        "server_busy", str(exc), headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}
    )


async def _deadline_exceeded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DeadlineExceeded)
    return error_response("deadline_exceeded", deadline_message(request))


def deadline_message(request: Request) -> str:
    seconds = deps.settings(request).request_timeout_s
    return (
        f"the request was not answered within its deadline ({seconds:g} s after its body "
        "arrived); its queued work was dropped"
    )


async def _reload_in_progress(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ReloadInProgress)
    return error_response("reload_in_progress", str(exc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = "no such route; see /docs for the API"
    elif exc.status_code == 405:
        message = "method not allowed on this route; see /docs for the API"
    else:
        message = str(exc.detail) if exc.detail else code.replace("_", " ")
    # The status is the exception's (Starlette raised it), not a code's: no error_response.
    return JSONResponse(
        error_body(code, message),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "invalid value"))
    return f"{location}: {message}" if location else message


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    missing_file = any(
        err.get("type") == "missing" and tuple(err.get("loc", ()))[-1:] in (("file",), ("files",))
        for err in errors
    )
    if missing_file:
        return error_response(
            "missing_file", "send the image as multipart/form-data in the field 'file'"
        )
    # Only locations and messages: never echo the submitted input back.
    message = "; ".join(_describe(err) for err in errors[:5]) or "invalid request"
    return error_response("validation_error", message)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # ServerErrorMiddleware calls this, then re-raises so the server logs the traceback;
    # the client gets no internals.
    return error_response("internal_error", "unexpected server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(ModelNotReady, _model_not_ready)
    app.add_exception_handler(ServerBusy, _server_busy)
    app.add_exception_handler(DeadlineExceeded, _deadline_exceeded)
    app.add_exception_handler(ReloadInProgress, _reload_in_progress)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
