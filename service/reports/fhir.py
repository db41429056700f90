"""The screening result as a FHIR R4 Bundle (type `collection`).

Per screened file, a DiagnosticReport (status `preliminary`: a screening aid, never a
final report) whose `result` is an Observation carrying the coded finding (SNOMED CT
233604007 "Pneumonia", value Present/Absent at the bundle's threshold, interpretation
POS/NEG) and the probability (a component with a UCUM "1" quantity). One Device, the
model (name, version, sha256 of model.onnx), is the Observation's `device`. A file that
could not be screened (batch only) is an OperationOutcome in its place.

Built as plain JSON and validated with fhir.resources' R4B models before it is sent; the
elements used are all in FHIR R4 (4.0.1) as well, hence `fhirVersion=4.0`. A DICOM input
adds what an EHR matches the report on: the patient identifier (PatientID) as `subject`,
the study (StudyInstanceUID) as `imagingStudy` and the order (AccessionNumber) as
`basedOn`, all logical references by identifier (there are no such resources here).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from service.bundle import BundleMeta
from service.inference import Scored
from service.reports.items import ReportItem

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MEDIA_TYPE = "application/fhir+json"
CONTENT_TYPE = "application/fhir+json; fhirVersion=4.0"

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"

PNEUMONIA = {"system": SNOMED, "code": "233604007", "display": "Pneumonia"}
# DICOM CID 240 "Present-Absent", the same codes as the DICOM SR.
PRESENT = {"system": SNOMED, "code": "52101004", "display": "Present"}
ABSENT = {"system": SNOMED, "code": "272519000", "display": "Absent"}
IMAGING_STUDY_REPORT = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
POSITIVE = {"system": _INTERPRETATION, "code": "POS", "display": "Positive"}
NEGATIVE = {"system": _INTERPRETATION, "code": "NEG", "display": "Negative"}
_RADIOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
_IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
_ACCESSION = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
    "code": "ACSN",
    "display": "Accession ID",
}
DISCLAIMER = "Screening aid, not a diagnosis: for priority review by a clinician."


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(header: Dataset | None, name: str) -> str | None:
    if header is None:
        return None
    value = header.get(name)
    text = str(value).strip() if value is not None else ""
    return text or None


def _study_date(header: Dataset | None) -> str | None:
    """StudyDate as a FHIR date when it parses, else None. Only the date: a FHIR dateTime
    with a time needs a time zone, which DICOM's StudyTime does not carry."""
    raw = _text(header, "StudyDate")
    if raw is None or len(raw) != 8 or not raw.isdigit():
        return None
    try:
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:])).isoformat()
    except ValueError:
        return None


def _subject(header: Dataset | None) -> dict[str, Any] | None:
    patient_id = _text(header, "PatientID")
    if patient_id is None:
        return None
    identifier: dict[str, Any] = {"value": patient_id}
    issuer = _text(header, "IssuerOfPatientID")
    if issuer is not None:
        identifier["assigner"] = {"display": issuer}
    return {"type": "Patient", "identifier": identifier}


def _study(header: Dataset | None) -> dict[str, Any] | None:
    study_uid = _text(header, "StudyInstanceUID")
    if study_uid is None:
        return None
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
    }


def device_resource(meta: BundleMeta) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "status": "active",
        "identifier": [
            {
                "type": {"text": "sha256 of model.onnx"},
                "value": meta.onnx_sha256,
            }
        ],
        "deviceName": [{"name": meta.name, "type": "model-name"}],
        "version": [{"value": meta.version}],
        "note": [{"text": meta.intended_use}],
    }


def observation_resource(
    result: Scored, meta: BundleMeta, header: Dataset | None, device_url: str, issued: str
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [{"coding": [_IMAGING]}],
        "code": {"coding": [PNEUMONIA], "text": "Pneumonia (AI screening)"},
        "issued": issued,
        "valueCodeableConcept": {
            "coding": [PRESENT if result.screen_positive else ABSENT],
        },
        "interpretation": [{"coding": [POSITIVE if result.screen_positive else NEGATIVE]}],
        "device": {"reference": device_url, "display": f"{meta.name} {meta.version}"},
        "component": [
            {
                "code": {"text": f"Probability of {meta.positive_label}"},
                "valueQuantity": {
                    "value": round(result.positive_probability, 6),
                    "unit": "probability",
                    "system": UCUM,
                    "code": "1",
                },
            },
            {
                "code": {"text": "Operating threshold"},
                "valueQuantity": {
                    "value": meta.threshold,
                    "unit": "probability",
                    "system": UCUM,
                    "code": "1",
                },
            },
        ],
        "note": [{"text": DISCLAIMER}],
    }
    _add_context(observation, header)
    study = _study(header)
    if study is not None:
        observation["derivedFrom"] = [study]
    return observation


def _add_context(resource: dict[str, Any], header: Dataset | None) -> None:
    subject = _subject(header)
    if subject is not None:
        resource["subject"] = subject
    effective = _study_date(header)
    if effective is not None:
        resource["effectiveDateTime"] = effective


def report_resource(
    result: Scored,
    meta: BundleMeta,
    header: Dataset | None,
    observation_url: str,
    issued: str,
) -> dict[str, Any]:
    decision = "positive" if result.screen_positive else "negative"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": _urn()}],
        "status": "preliminary",
        "category": [{"coding": [_RADIOLOGY]}],
        "code": {"coding": [IMAGING_STUDY_REPORT], "text": "AI pneumonia screening"},
        "issued": issued,
        "result": [{"reference": observation_url}],
        "conclusion": (
            f"Screen {decision} for pneumonia: probability "
            f"{result.positive_probability:.4f}, threshold {meta.threshold:.4f}. {DISCLAIMER}"
        ),
    }
    if result.screen_positive:
        report["conclusionCode"] = [{"coding": [PNEUMONIA]}]
    _add_context(report, header)
    accession = _text(header, "AccessionNumber")
    if accession is not None:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {"type": {"coding": [_ACCESSION]}, "value": accession},
            }
        ]
    study = _study(header)
    if study is not None:
        report["imagingStudy"] = [study]
    return report


def outcome_resource(item: ReportItem) -> dict[str, Any]:
    assert item.error is not None
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "invalid" if item.error.status_code < 500 else "exception",
                "details": {"text": item.error.code},
                "diagnostics": item.error.message,
            }
        ],
    }


def bundle_dict(
    items: list[ReportItem], meta: BundleMeta, now: datetime | None = None
) -> dict[str, Any]:
    """The Bundle as JSON-ready data, validated against the R4B models."""
    from fhir.resources.R4B.bundle import Bundle

    issued = _instant(now or datetime.now(UTC))
    device_url = _urn()
    entries: list[dict[str, Any]] = []
    for item in items:
        if item.result is None:
            entries.append({"fullUrl": _urn(), "resource": outcome_resource(item)})
            continue
        observation_url = _urn()
        entries.append(
            {
                "fullUrl": _urn(),
                "resource": report_resource(
                    item.result, meta, item.header, observation_url, issued
                ),
            }
        )
        entries.append(
            {
                "fullUrl": observation_url,
                "resource": observation_resource(
                    item.result, meta, item.header, device_url, issued
                ),
            }
        )
    entries.append({"fullUrl": device_url, "resource": device_resource(meta)})
    data = {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": _urn()},
        "type": "collection",
        "timestamp": issued,
        "entry": entries,
    }
    # Raises on a structural mistake of ours (a server bug, 500), never on the input.
    Bundle.model_validate(data)
    return data
