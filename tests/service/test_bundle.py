"""The bundle contract: write, read back, and refuse anything corrupt or incomplete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bundle import META_FILE, MODEL_FILE, BundleError, BundleMeta, read_bundle
from tests.support.bundle_factory import make_tiny_bundle


def test_round_trip(tmp_path: Path) -> None:
    written = make_tiny_bundle(tmp_path, size=48, threshold=0.37)
    read = read_bundle(tmp_path)
    assert read == written
    assert read.input.height == 48 and read.threshold == pytest.approx(0.37)
    assert read.positive_indices() == [1]
    assert len(read.onnx_sha256) == 64


def test_three_label_bundle(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path, labels=("NORMAL", "BACTERIAL", "VIRAL"))
    assert read_bundle(tmp_path).positive_indices() == [1, 2]
    assert meta.positive_label == "PNEUMONIA"


def test_modified_model_is_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    with (tmp_path / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(tmp_path)
    read_bundle(tmp_path, verify=False)  # the metadata itself is still readable


@pytest.mark.parametrize("missing", [MODEL_FILE, META_FILE])
def test_incomplete_bundle_is_refused(tmp_path: Path, missing: str) -> None:
    make_tiny_bundle(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(BundleError, match="no model bundle"):
        read_bundle(tmp_path)


def test_inconsistent_labels_are_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["positive_labels"] = ["BACTERIAL"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="positive_labels"):
        read_bundle(tmp_path)


def test_future_format_is_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format"):
        read_bundle(tmp_path)


def test_schema_documents_the_contract() -> None:
    schema = BundleMeta.model_json_schema()
    for field in (
        "labels",
        "threshold",
        "input",
        "onnx_sha256",
        "validation_metrics",
        "tool_versions",
        "created_at",
        "backbone",
        "training_data",
    ):
        assert field in schema["properties"]
