"""/predict and /predict/batch answering DICOM SR and FHIR R4 by Accept, over real HTTP.

Every answer is parsed with the standard's own library: pydicom and highdicom for the
SR, fhir.resources (R4B models) for the Bundle.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from PIL import Image
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from service.bundle import read_bundle
from tests.support.dicom_factory import (
    FAKE_ACCESSION,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    make_dataset,
    to_bytes,
)
from tests.support.live_server import LiveServer
from tests.support.xray_samples import FULLRES, reference_probabilities

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
SR = "application/dicom"
FHIR = "application/fhir+json"
MULTIPART_SR = 'multipart/related; type="application/dicom"'


def _xray_dataset() -> pydicom.Dataset:
    return make_dataset(np.asarray(Image.open(FULLRES[0]).convert("L")))


def _bright_dataset() -> pydicom.Dataset:
    # Nearly all white: the tiny model (a brightness read-out) calls it positive.
    pixels = np.full((96, 96), 250, dtype=np.uint8)
    pixels[0, :8] = 0
    return make_dataset(pixels)


def _post(
    server: LiveServer, data: bytes, accept: str | None, route: str = "/predict"
) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    return httpx.post(server.url(route), files={"file": ("x", data)}, headers=headers, timeout=60)


def _image_group(sr_dataset: pydicom.Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sr = hd.sr.ComprehensiveSR.from_dataset(sr_dataset)
    (group,) = sr.content.get_image_measurement_groups()
    return group


def test_dicom_in_sr_out(server: LiveServer, tiny_bundle: Path) -> None:
    meta = read_bundle(tiny_bundle)
    for source in (_xray_dataset(), _bright_dataset()):
        data = to_bytes(source)
        response = _post(server, data, SR)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/dicom"
        sr = pydicom.dcmread(io.BytesIO(response.content))
        expected = reference_probabilities(tiny_bundle, data)["PNEUMONIA"]
        positive = expected >= meta.threshold

        # A Comprehensive SR in the source's patient and study, in a new series.
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.SOPInstanceUID not in (source.SOPInstanceUID, source.SeriesInstanceUID)
        assert sr.PatientID == FAKE_PATIENT_ID and str(sr.PatientName) == FAKE_PATIENT_NAME
        assert sr.AccessionNumber == FAKE_ACCESSION
        assert sr.VerificationFlag == "UNVERIFIED"
        assert sr.PreliminaryFlag == "PRELIMINARY" and sr.CompletionFlag == "COMPLETE"
        (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
        (series,) = evidence.ReferencedSeriesSequence
        (instance,) = series.ReferencedSOPSequence
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert instance.ReferencedSOPInstanceUID == source.SOPInstanceUID

        # TID 1500 content, read back with highdicom.
        assert isinstance(hd.sr.ComprehensiveSR.from_dataset(sr).content, hd.sr.MeasurementReport)
        assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        group = _image_group(sr)
        assert group.finding_type == PNEUMONIA
        (source_image,) = group.source_images
        assert source_image.referenced_sop_instance_uid == source.SOPInstanceUID
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == PNEUMONIA
        assert evaluation.value == (codes.SCT.Present if positive else codes.SCT.Absent)
        (measurement,) = group.get_measurements()
        assert measurement.name == codes.DCM.Probability
        assert measurement.unit == codes.UCUM.NoUnits
        assert measurement.value == pytest.approx(expected, abs=1e-6)
        (image_ref,) = measurement.referenced_images
        assert image_ref.referenced_sop_instance_uid == source.SOPInstanceUID

        # The algorithm: name, version, sha256 (TID 4019).
        (container,) = group
        texts: dict[str, list[str]] = {}
        for item in container.ContentSequence:  # the group's own items, not the measurement's
            if item.ValueType == "TEXT":
                texts.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(
                    item.TextValue
                )
        assert texts["Algorithm Name"] == [meta.name]
        assert texts["Algorithm Version"] == [meta.version]
        assert f"model.onnx sha256: {meta.onnx_sha256}" in texts["Algorithm Parameters"]
    assert FAKE_PATIENT_ID not in server.log() and FAKE_PATIENT_NAME not in server.log()


def test_sr_observer_is_the_model_as_a_device(server: LiveServer, tiny_bundle: Path) -> None:
    meta = read_bundle(tiny_bundle)
    first = pydicom.dcmread(io.BytesIO(_post(server, to_bytes(_xray_dataset()), SR).content))
    second = pydicom.dcmread(io.BytesIO(_post(server, to_bytes(_bright_dataset()), SR).content))

    def device(sr: pydicom.Dataset) -> dict[str, str]:
        items = {}
        for item in sr.ContentSequence:
            if item.RelationshipType == "HAS OBS CONTEXT":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                value = item.get("UID") or item.get("TextValue") or item.get("ConceptCodeSequence")
                items[name] = value
        return items

    one, two = device(first), device(second)
    assert one["Observer Type"][0].CodeValue == "121007"  # Device
    assert one["Device Observer UID"] == two["Device Observer UID"]  # one model, one device
    assert one["Device Observer Name"] == meta.name
    # New series and instance each time.
    assert first.SeriesInstanceUID != second.SeriesInstanceUID


def test_sr_needs_a_dicom_input(server: LiveServer) -> None:
    jpeg = FULLRES[0].read_bytes()
    response = _post(server, jpeg, SR)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "dicom_input_required"


def test_sr_needs_the_source_identifiers(server: LiveServer) -> None:
    source = _xray_dataset()
    del source.StudyInstanceUID
    response = _post(server, to_bytes(source), SR)
    assert response.status_code == 422
    body = response.json()["error"]
    assert body["code"] == "dicom_header_incomplete"
    assert "StudyInstanceUID" in body["message"]


def test_sr_of_a_source_without_type2_attributes(server: LiveServer) -> None:
    # An anonymised image without patient name, birth date, study ID ...: the SR still
    # conforms (Type 2 attributes are written empty).
    source = _xray_dataset()
    for name in ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        delattr(source, name)
    response = _post(server, to_bytes(source), SR)
    assert response.status_code == 200, response.text
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert "PatientName" in sr and not sr.PatientName
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def _fhir_bundle(response: httpx.Response) -> Bundle:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/fhir+json; fhirVersion=4.0"
    return Bundle.model_validate_json(response.content)


def _resources(bundle: Bundle, kind: str) -> list:
    return [entry.resource for entry in bundle.entry if entry.resource.get_resource_type() == kind]


def test_fhir_bundle_for_a_jpeg(server: LiveServer, tiny_bundle: Path) -> None:
    meta = read_bundle(tiny_bundle)
    data = FULLRES[1].read_bytes()
    bundle = _fhir_bundle(_post(server, data, FHIR))
    expected = reference_probabilities(tiny_bundle, data)["PNEUMONIA"]
    assert bundle.type == "collection"
    (report,) = _resources(bundle, "DiagnosticReport")
    (observation,) = _resources(bundle, "Observation")
    (device,) = _resources(bundle, "Device")
    urls = {entry.resource.get_resource_type(): entry.fullUrl for entry in bundle.entry}

    assert report.status == "preliminary" and observation.status == "preliminary"
    assert [r.reference for r in report.result] == [urls["Observation"]]
    assert observation.device.reference == urls["Device"]
    assert report.subject is None  # a JPEG names no patient
    coding = observation.code.coding[0]
    assert (coding.system, coding.code) == ("http://snomed.info/sct", "233604007")
    value = observation.valueCodeableConcept.coding[0]
    assert value.code == ("52101004" if expected >= meta.threshold else "272519000")
    probability = observation.component[0].valueQuantity
    assert float(probability.value) == pytest.approx(expected, abs=1e-6)
    assert (probability.system, probability.code) == ("http://unitsofmeasure.org", "1")
    assert device.deviceName[0].name == meta.name
    assert device.version[0].value == meta.version
    assert device.identifier[0].value == meta.onnx_sha256


def test_fhir_bundle_for_a_dicom_names_patient_study_and_order(server: LiveServer) -> None:
    source = _bright_dataset()
    bundle = _fhir_bundle(_post(server, to_bytes(source), FHIR))
    (report,) = _resources(bundle, "DiagnosticReport")
    (observation,) = _resources(bundle, "Observation")
    for resource in (report, observation):
        assert resource.subject.identifier.value == FAKE_PATIENT_ID
        assert str(resource.effectiveDateTime) == "2024-01-01"
    (study,) = report.imagingStudy
    assert study.identifier.system == "urn:dicom:uid"
    assert study.identifier.value == f"urn:oid:{source.StudyInstanceUID}"
    assert report.basedOn[0].identifier.value == FAKE_ACCESSION
    assert report.conclusionCode[0].coding[0].code == "233604007"  # screen positive
    assert observation.interpretation[0].coding[0].code == "POS"


def test_batch_multipart_related_sr_in_request_order(server: LiveServer, tiny_bundle: Path) -> None:
    sources = [_xray_dataset(), _bright_dataset()]
    files = [
        ("files", ("a.dcm", to_bytes(sources[0]))),
        ("files", ("b.jpeg", FULLRES[2].read_bytes())),
        ("files", ("c.dcm", to_bytes(sources[1]))),
    ]
    response = httpx.post(
        server.url("/predict/batch"), files=files, headers={"Accept": MULTIPART_SR}, timeout=60
    )
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + response.content
    )
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == [
        "application/dicom",
        "application/json",
        "application/dicom",
    ]
    error = json.loads(parts[1].get_payload(decode=True))
    assert error["error"]["code"] == "dicom_input_required" and error["filename"] == "b.jpeg"
    for part, source in zip((parts[0], parts[2]), sources, strict=True):
        sr = pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        group = _image_group(sr)
        (measurement,) = group.get_measurements()
        expected = reference_probabilities(tiny_bundle, to_bytes(source))["PNEUMONIA"]
        assert measurement.value == pytest.approx(expected, abs=1e-6)


def test_batch_fhir_one_bundle_with_an_outcome_per_bad_file(server: LiveServer) -> None:
    files = [
        ("files", ("a.jpeg", FULLRES[0].read_bytes())),
        ("files", ("b.txt", b"not an image")),
        ("files", ("c.dcm", to_bytes(_xray_dataset()))),
    ]
    response = httpx.post(
        server.url("/predict/batch"), files=files, headers={"Accept": FHIR}, timeout=60
    )
    bundle = _fhir_bundle(response)
    kinds = [entry.resource.get_resource_type() for entry in bundle.entry]
    assert kinds == [
        "DiagnosticReport",
        "Observation",
        "OperationOutcome",
        "DiagnosticReport",
        "Observation",
        "Device",
    ]
    (outcome,) = _resources(bundle, "OperationOutcome")
    assert outcome.issue[0].details.text == "unsupported_media_type"


@pytest.mark.parametrize(
    ("route", "accept"),
    [
        ("/predict", "text/html"),
        ("/predict", "application/dicom;q=0, application/json;q=0"),
        ("/predict", MULTIPART_SR),
        ("/predict/batch", "application/dicom"),
        ("/predict", "application/fhir+json; fhirVersion=5.0"),
    ],
)
def test_not_acceptable(server: LiveServer, route: str, accept: str) -> None:
    field = "file" if route == "/predict" else "files"
    response = httpx.post(
        server.url(route),
        headers={"Accept": accept},
        timeout=30,
        files={field: ("x.jpeg", FULLRES[0].read_bytes())},
    )
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "not_acceptable"


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/*", "application/json", "text/html, application/json;q=0.5"],
)
def test_json_stays_the_default(server: LiveServer, accept: str | None) -> None:
    response = _post(server, FULLRES[0].read_bytes(), accept)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) >= {"label", "probabilities", "threshold"}


def test_openapi_shows_the_accept_variants(server: LiveServer) -> None:
    schema = httpx.get(server.url("/openapi.json"), timeout=30).json()
    single = schema["paths"]["/predict"]["post"]["responses"]
    batch = schema["paths"]["/predict/batch"]["post"]["responses"]
    assert set(single["200"]["content"]) == {"application/json", SR, FHIR}
    assert set(batch["200"]["content"]) == {"application/json", MULTIPART_SR, FHIR}
    assert single["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert "406" in single and "422" in single and "406" in batch
    assert "dicom_input_required" in single["422"]["description"]


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(
    DCIODVFY is None,
    reason="dciodvfy absent (Debian: apt-get install dicom3tools; .ci/run installs it)",
)
def test_sr_passes_the_dicom_iod_validator(server: LiveServer, tmp_path: Path) -> None:
    anonymised = _xray_dataset()
    for name in ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        delattr(anonymised, name)
    for index, source in enumerate((_xray_dataset(), _bright_dataset(), anonymised)):
        response = _post(server, to_bytes(source), SR)
        assert response.status_code == 200, response.text
        path = tmp_path / f"sr{index}.dcm"
        path.write_bytes(response.content)
        assert DCIODVFY is not None
        result = subprocess.run(
            [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        report = (result.stdout + result.stderr).strip()
        # dciodvfy names the IOD it recognised, with a line per error or warning.
        assert "ComprehensiveSR" in report.splitlines(), report
        # The test images have no StudyTime or StudyID: the SR copies them as empty
        # (Type 2), which dciodvfy only notes as too little for a DICOMDIR.
        problems = [
            line
            for line in report.splitlines()
            if line.startswith(("Error", "Warning"))
            and "needed to build DICOMDIR - Study " not in line
        ]
        assert not problems, report
