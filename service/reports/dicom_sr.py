"""The screening result as a DICOM Comprehensive SR (TID 1500 Measurement Report).

Built with highdicom, in the shape the IHE AI Results (AIR) profile asks of an AI
result, as far as an image-level (no region) finding allows:

- same patient and study as the source image (copied from its header), a new series;
- observer context: the algorithm as a device observer (TID 1004); its UID is derived
  from the model's sha256, so one model is one device;
- one measurement group (TID 1501) on the whole image: finding type SNOMED CT 233604007
  "Pneumonia", a qualitative evaluation "Pneumonia = Present/Absent" (SNOMED CT codes of
  DICOM CID 240) at the bundle's threshold, and the probability as a numeric measurement
  (DCM 122157 "Probability", UCUM "1"), each referencing the source SOP instance;
- algorithm identification (TID 4019): the bundle's name and version, with the model's
  sha256 and the threshold as algorithm parameters;
- VerificationFlag UNVERIFIED and PreliminaryFlag PRELIMINARY: a screening aid, not a
  signed report. CompletionFlag COMPLETE: nothing more will be added to this result.
"""

from __future__ import annotations

import functools
import io
import uuid
from types import SimpleNamespace
from typing import TYPE_CHECKING

from service.bundle import BundleMeta
from service.inference import Scored

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MEDIA_TYPE = "application/dicom"
MANUFACTURER = "pneumoscreen"
# A high series number keeps the result series after the acquisition series in viewers.
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "pneumoscreen AI result - screening aid, not a diagnosis"

# Attributes an SR cannot do without: it copies the study and references the instance.
REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


# Type 2 attributes of the Patient and General Study modules: the SR copies them from the
# source; one the source lacks is written empty, as Type 2 allows.
COPIED_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class SourceHeaderError(ValueError):
    """The DICOM input lacks (or has unusable) identifiers the SR must copy. The message
    names attributes, never their values (they may identify a patient)."""


@functools.cache
def _codes() -> SimpleNamespace:
    """The coded concepts of the report (imported on first use: highdicom is only needed
    when someone asks for an SR)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    return SimpleNamespace(
        pneumonia=CodedConcept("233604007", "SCT", "Pneumonia"),
        chest_xray=CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        present=codes.SCT.Present,  # DICOM CID 240 Present-Absent
        absent=codes.SCT.Absent,
        probability=codes.DCM.Probability,
        no_units=codes.UCUM.NoUnits,
        device=codes.DCM.Device,
    )


def device_uid(meta: BundleMeta) -> str:
    """A stable UID for the model, from its sha256: one model, one device. The 2.25 form
    (PS3.5 B.2) of a name-based UUID, so no UID root of our own is needed."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'pneumoscreen:' + meta.onnx_sha256).int}"


def check_source(header: Dataset) -> None:
    missing = [name for name in REQUIRED_SOURCE_ATTRIBUTES if not header.get(name)]
    if missing:
        raise SourceHeaderError(
            "the DICOM input has no " + ", ".join(missing) + "; a DICOM SR must reference "
            "the source study, series and instance"
        )


def _evidence(source: Dataset) -> Dataset:
    """The source's identity only (not its other attributes): what the SR copies and
    references."""
    from pydicom.dataset import Dataset

    evidence = Dataset()
    if "SpecificCharacterSet" in source:
        evidence.SpecificCharacterSet = source.SpecificCharacterSet
    for name in REQUIRED_SOURCE_ATTRIBUTES + COPIED_SOURCE_ATTRIBUTES:
        element = source.get(name)
        setattr(evidence, name, element if element is not None else "")
    return evidence


def build_sr(result: Scored, meta: BundleMeta, source: Dataset) -> Dataset:
    """The Comprehensive SR dataset for one screened DICOM image."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    check_source(source)
    c = _codes()
    algorithm = hd.sr.AlgorithmIdentification(
        name=meta.name,
        version=meta.version,
        parameters=[
            f"model.onnx sha256: {meta.onnx_sha256}",
            f"operating threshold: {meta.threshold}",
        ],
        manufacturer=MANUFACTURER,
    )
    observer = hd.sr.ObserverContext(
        observer_type=c.device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(meta),
            name=meta.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{meta.name} {meta.version}",
        ),
    )
    sop_class, sop_instance = str(source.SOPClassUID), str(source.SOPInstanceUID)
    image = hd.sr.SourceImageForMeasurement(sop_class, sop_instance)
    probability = hd.sr.Measurement(
        name=c.probability,
        value=round(result.positive_probability, 6),
        unit=c.no_units,
        referenced_images=[image],
    )
    finding = hd.sr.QualitativeEvaluation(
        name=c.pneumonia, value=c.present if result.screen_positive else c.absent
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier="pneumonia screening"
        ),
        finding_type=c.pneumonia,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[finding],
        source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class, sop_instance)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.chest_xray,
        imaging_measurements=[group],
    )
    try:
        return hd.sr.ComprehensiveSR(
            evidence=[_evidence(source)],
            content=report,
            series_instance_uid=generate_uid(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=meta.name,
            software_versions=meta.version,
        )
    except (ValueError, TypeError, KeyError) as exc:
        # highdicom validates what it copies (names, dates, UIDs); the exception type
        # only, as its message could quote a patient attribute.
        raise SourceHeaderError(
            f"the DICOM input's patient or study attributes cannot be copied into a "
            f"DICOM SR ({type(exc).__name__})"
        ) from None


def sr_bytes(result: Scored, meta: BundleMeta, source: Dataset) -> bytes:
    """`build_sr` as a DICOM Part 10 file."""
    from pydicom import dcmwrite

    dataset = build_sr(result, meta, source)
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
