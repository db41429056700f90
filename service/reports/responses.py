"""The answer of /predict and /predict/batch in the media type the client accepts.

    Accept                                     /predict          /predict/batch
    application/json (default, */*)            our JSON          our JSON
    application/dicom                          one DICOM SR      406
    multipart/related; type="application/dicom"  406             one SR per file
    application/fhir+json                      FHIR Bundle       one FHIR Bundle

A DICOM SR needs a DICOM input (its patient, study and instance): any other input
answers 422 `dicom_input_required`, checked on the file's bytes before it is decoded.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from service.bundle import BundleMeta
from service.errors import ApiError, error_body
from service.preprocessing import DICOM as DICOM_FORMAT
from service.preprocessing import sniff_format
from service.reports import dicom_sr, fhir
from service.reports.items import ReportItem
from service.reports.negotiation import MediaType, choose

JSON = MediaType("application", "json")
DICOM = MediaType("application", "dicom")
DICOM_MULTIPART = MediaType("multipart", "related", {"type": "application/dicom"})
FHIR = MediaType("application", "fhir+json", {"fhirversion": "4.0"})

SINGLE_OFFERS: tuple[MediaType, ...] = (JSON, DICOM, FHIR)
BATCH_OFFERS: tuple[MediaType, ...] = (JSON, DICOM_MULTIPART, FHIR)
_DICOM_ANSWERS = (DICOM, DICOM_MULTIPART)


def negotiate(request: Request, offers: Sequence[MediaType]) -> MediaType:
    """The media type to answer with (406 not_acceptable when the client takes none).
    Called before the body is read."""
    chosen = choose(request.headers.get("accept"), offers)
    if chosen is None:
        supported = ", ".join(str(offer) for offer in offers)
        raise ApiError(
            "not_acceptable", f"this route answers one of: {supported} (see the Accept header)"
        )
    return chosen


def wants_dicom(answer: MediaType) -> bool:
    return answer in _DICOM_ANSWERS


def dicom_input_required(data: bytes) -> ApiError | None:
    """422 for a non-DICOM file when a DICOM SR is asked for; None for a DICOM file."""
    if sniff_format(data) == DICOM_FORMAT:
        return None
    return ApiError(
        "dicom_input_required",
        "a DICOM SR answer (Accept: application/dicom) needs a DICOM input: it reports on "
        "the source image's patient, study and instance; send a DICOM file, or ask for "
        "application/json or application/fhir+json",
    )


def _sr(item: ReportItem, meta: BundleMeta) -> bytes:
    assert item.result is not None and item.header is not None
    try:
        return dicom_sr.sr_bytes(item.result, meta, item.header)
    except dicom_sr.SourceHeaderError as exc:
        raise ApiError("dicom_header_incomplete", str(exc)) from None


def _fhir(items: list[ReportItem], meta: BundleMeta) -> bytes:
    return json.dumps(fhir.bundle_dict(items, meta)).encode()


async def single_report(answer: MediaType, item: ReportItem, meta: BundleMeta) -> Response:
    """The answer to /predict for a non-JSON media type (built off the event loop)."""
    if answer == DICOM:
        body = await run_in_threadpool(_sr, item, meta)
        return Response(body, media_type=dicom_sr.MEDIA_TYPE)
    body = await run_in_threadpool(_fhir, [item], meta)
    return Response(body, media_type=fhir.CONTENT_TYPE)


def _multipart(items: list[ReportItem], meta: BundleMeta) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for item in items:
        error = item.error
        if error is None:
            try:
                part, kind = _sr(item, meta), dicom_sr.MEDIA_TYPE
            except ApiError as exc:
                error = exc
        if error is not None:
            body: dict[str, Any] = error_body(error.code, error.message)
            if item.filename is not None:
                body["filename"] = item.filename
            part, kind = json.dumps(body).encode(), "application/json"
        chunks.append(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + part + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


async def batch_report(answer: MediaType, items: list[ReportItem], meta: BundleMeta) -> Response:
    """The answer to /predict/batch for a non-JSON media type: a multipart/related of one
    part per file, in request order (an SR, or an application/json error part for a
    file that could not be screened), or one FHIR Bundle."""
    if answer == DICOM_MULTIPART:
        body, content_type = await run_in_threadpool(_multipart, items, meta)
        return Response(body, headers={"content-type": content_type})
    body = await run_in_threadpool(_fhir, items, meta)
    return Response(body, media_type=fhir.CONTENT_TYPE)


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FHIR_EXAMPLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {
            "fullUrl": "urn:uuid:...",
            "resource": {
                "resourceType": "DiagnosticReport",
                "status": "preliminary",
                "result": [{"reference": "urn:uuid:(the Observation)"}],
            },
        },
        {
            "fullUrl": "urn:uuid:...",
            "resource": {
                "resourceType": "Observation",
                "status": "preliminary",
                "code": {"coding": [fhir.PNEUMONIA]},
                "valueCodeableConcept": {"coding": [fhir.PRESENT]},
                "component": [
                    {
                        "code": {"text": "Probability of PNEUMONIA"},
                        "valueQuantity": {"value": 0.97, "system": fhir.UCUM, "code": "1"},
                    }
                ],
            },
        },
        {
            "fullUrl": "urn:uuid:...",
            "resource": {
                "resourceType": "Device",
                "deviceName": [{"name": "pneumonia-mobilenet", "type": "model-name"}],
            },
        },
    ],
}


def openapi_responses(batch: bool) -> dict[int | str, dict[str, Any]]:
    """The 200 answer's extra media types, as OpenAPI shows them (Swagger UI sends the one
    picked in its "Media type" list as Accept)."""
    dicom_note = (
        '`multipart/related; type="application/dicom"`: one DICOM Comprehensive SR per '
        "file (TID 1500), in request order; a file that could not be screened is an "
        "`application/json` part with its error."
        if batch
        else "`application/dicom`: a DICOM Comprehensive SR (TID 1500) in the input's study; "
        "needs a DICOM input (422 `dicom_input_required` otherwise)."
    )
    dicom_type = str(DICOM_MULTIPART) if batch else str(DICOM)
    return {
        200: {
            "description": "The screening result, in the media type of the Accept header. "
            "`application/json` (default): the body below. " + dicom_note + " "
            "`application/fhir+json`: a FHIR R4 Bundle (DiagnosticReport, Observation, "
            "Device). See docs/integration.md.",
            "content": {dicom_type: _BINARY, fhir.MEDIA_TYPE: {"example": _FHIR_EXAMPLE}},
        }
    }
