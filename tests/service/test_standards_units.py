"""Units of the standards work: Accept negotiation, the v2 codec (checked against
tritonclient's own serialisation), the DICOM header kept from the one decode, and the
error-code table of docs/api.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.http import InferResult
from tritonclient.utils import serialize_byte_tensor

from service import open_inference as oip
from service.errors import ERROR_CODES
from service.preprocessing import load_model_input, load_model_input_with_header
from service.reports.negotiation import MediaType, choose
from service.reports.responses import BATCH_OFFERS, DICOM, DICOM_MULTIPART, FHIR, JSON
from tests.support.dicom_factory import FAKE_PATIENT_ID, dicom_bytes
from tests.support.xray_samples import FULLRES

REPO = Path(__file__).resolve().parents[2]
SINGLE = (JSON, DICOM, FHIR)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/dicom", DICOM),
        ("application/dicom, application/json", DICOM),
        ("application/json, application/dicom", JSON),
        ("application/json;q=0.4, application/dicom;q=0.9", DICOM),
        ("application/dicom, */*", DICOM),
        ("*/*;q=0.1, application/fhir+json", FHIR),
        ("application/fhir+json; fhirVersion=4.0", FHIR),
        ("APPLICATION/DICOM", DICOM),
        ("application/*", JSON),
        ("text/html", None),
        ("application/dicom;q=0", None),
        ("*/*, application/json;q=0", DICOM),
        ("application/fhir+json; fhirVersion=5.0", None),
        ("nonsense", JSON),  # nothing parses: as if absent
    ],
)
def test_choose(accept: str | None, expected: MediaType | None) -> None:
    assert choose(accept, SINGLE) == expected


def test_choose_multipart_needs_the_type_parameter() -> None:
    assert choose('multipart/related; type="application/dicom"', BATCH_OFFERS) == DICOM_MULTIPART
    assert choose("multipart/related; type=application/dicom", BATCH_OFFERS) == DICOM_MULTIPART
    assert choose("multipart/related", BATCH_OFFERS) == DICOM_MULTIPART
    assert choose('multipart/related; type="application/dicom+xml"', BATCH_OFFERS) is None
    assert str(DICOM_MULTIPART) == 'multipart/related; type="application/dicom"'


def _binary_request(files: list[bytes], **extra: object) -> tuple[bytes, str]:
    # As tritonclient's InferInput does with binary_data=True.
    blob = serialize_byte_tensor(np.array(files, dtype=np.object_)).item()
    head = json.dumps(
        {
            "id": "7",
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(files)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            **extra,
        }
    ).encode()
    return head + blob, str(len(head))


def test_codec_reads_tritonclient_bytes_and_writes_what_it_reads() -> None:
    files = [b"\xff\xd8\xff first", b"", b"\x89PNG\r\n\x1a\n third"]
    body, length = _binary_request(
        files,
        outputs=[
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "probabilities"},
            {"name": "screen_positive", "parameters": {"binary_data": True}},
        ],
    )
    request = oip.parse_infer_request(body, length, max_items=8, max_item_bytes=1000)
    assert request.images == files and request.id == "7"
    assert [(o.name, o.binary) for o in request.outputs] == [
        ("label", True),
        ("probabilities", False),
        ("screen_positive", True),
    ]
    tensors = oip.output_tensors(
        ["NORMAL", "PNEUMONIA"],
        [
            {"NORMAL": 0.25, "PNEUMONIA": 0.75},
            {"NORMAL": 0.9, "PNEUMONIA": 0.1},
            {"NORMAL": 0.5, "PNEUMONIA": 0.5},
        ],
        ["PNEUMONIA", "NORMAL", "PNEUMONIA"],
        [True, False, True],
    )
    response, header_length = oip.encode_infer_response("m", "1", request, tensors)
    result = InferResult.from_response_body(response, header_length=header_length)
    np.testing.assert_array_equal(
        result.as_numpy("probabilities"),
        np.array([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]], dtype=np.float32),
    )
    assert result.as_numpy("label").tolist() == [b"PNEUMONIA", b"NORMAL", b"PNEUMONIA"]
    assert result.as_numpy("screen_positive").tolist() == [True, False, True]
    assert result.get_response()["id"] == "7"


def test_codec_json_only_answer_has_no_header_length() -> None:
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [["AAEC"]]}]}
    ).encode()
    request = oip.parse_infer_request(body, None, max_items=1, max_item_bytes=10)
    assert request.images == [b"\x00\x01\x02"]
    tensors = oip.output_tensors(["A", "B"], [{"A": 1.0, "B": 0.0}], ["A"], [False])
    response, header_length = oip.encode_infer_response("m", "1", request, tensors)
    assert header_length is None
    assert json.loads(response)["outputs"][2] == {
        "name": "screen_positive",
        "datatype": "BOOL",
        "shape": [1],
        "data": [False],
    }


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda body, n: (body[:-1], n), 400),  # truncated element
        (lambda body, n: (body + b"x", n), 400),  # bytes past the declared size
        (lambda body, n: (body, str(len(body) + 1)), 400),  # header length past the body
        (lambda body, n: (body, "ten"), 400),
    ],
)
def test_codec_rejects_bad_binary_framing(mutate, status: int) -> None:
    body, length = _binary_request([b"abc", b"defg"])
    bad_body, bad_length = mutate(body, length)
    with pytest.raises(oip.ProtocolError) as caught:
        oip.parse_infer_request(bad_body, bad_length, max_items=8, max_item_bytes=100)
    assert caught.value.status == status


def test_codec_limits() -> None:
    body, length = _binary_request([b"a" * 11])
    with pytest.raises(oip.ProtocolError) as caught:
        oip.parse_infer_request(body, length, max_items=8, max_item_bytes=10)
    assert caught.value.status == 413
    body, length = _binary_request([b"a"] * 3)
    with pytest.raises(oip.ProtocolError) as caught:
        oip.parse_infer_request(body, length, max_items=2, max_item_bytes=10)
    assert caught.value.status == 413


def test_dicom_header_comes_from_the_same_decode_without_pixels() -> None:
    grey = np.asarray(Image.open(FULLRES[0]).convert("L"))
    data = dicom_bytes(grey)
    image, header = load_model_input_with_header(data, 64, 64)
    np.testing.assert_array_equal(image, load_model_input(data, 64, 64))
    assert header is not None and header.PatientID == FAKE_PATIENT_ID
    assert "PixelData" not in header and "StudyInstanceUID" in header
    _, none = load_model_input_with_header(FULLRES[0].read_bytes(), 64, 64)
    assert none is None


def test_every_error_code_is_in_the_api_doc_table() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    pattern = r"^\|\s*(\d{3})\s*\|\s*`([a-z_]+)`\s*\|"
    rows = {code: int(status) for status, code in re.findall(pattern, text, re.MULTILINE)}
    for code, (status, _) in ERROR_CODES.items():
        assert rows.get(code) == status, f"docs/api.md lacks {code} ({status})"
