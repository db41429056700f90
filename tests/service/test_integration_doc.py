"""docs/integration.md's examples (curl, pydicom, highdicom, fhir.resources, tritonclient)
run, in order, against the real server: the document cannot drift from the service."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.doc_examples import blocks, run_examples
from tests.support.live_server import LiveServer

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "integration.md"
XRAY = (
    REPO
    / "tests"
    / "fixtures"
    / "chest_xray"
    / "val"
    / "PNEUMONIA"
    / ("person1946_bacteria_4874.jpeg")
)


def test_integration_examples_run(server: LiveServer, tmp_path: Path) -> None:
    shutil.copy(XRAY, tmp_path / "chest.jpeg")
    host = server.base_url.removeprefix("http://")
    ran = run_examples(DOC, tmp_path, host=host, model="tiny-test-model")
    assert len(ran) == len(blocks(DOC.read_text())) >= 9, [r.language for r in ran]
    for item in ran:
        assert item.returncode == 0, f"{item.language} example failed:\n{item.code}\n{item.output}"
    outputs = "\n".join(item.output for item in ran)
    # What each reader is told to expect, from the tiny model's answers.
    assert "Comprehensive SR Storage SR UNVERIFIED PRELIMINARY" in outputs
    assert "same study: True new series: True" in outputs
    assert "SR of study True" in outputs and '"code": "dicom_input_required"' in outputs
    assert "collection preliminary Screen" in outputs and "patient PID-0001" in outputs
    assert "study-42 [[" in outputs and '"model_name": "tiny-test-model"' in outputs
