"""The model bundle: the only contract between training/export and serving.

    <bundle>/model.onnx   input "image": uint8 [batch, H, W, 3]
                          output "probabilities": float32 [batch, n_labels], rows sum to 1
    <bundle>/model.json   BundleMeta below, including the sha256 of model.onnx

docs/bundle.md is the human-readable spec of the same thing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
META_FILE = "model.json"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
INTENDED_USE = (
    "Screening aid for pediatric chest radiographs: it flags images likely to show "
    "pneumonia for priority review. It is not a diagnosis and does not replace a clinician."
)


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete, corrupt or not of this format."""


class InputSpec(BaseModel):
    name: Literal["image"] = INPUT_NAME
    height: int = Field(gt=0, examples=[224])
    width: int = Field(gt=0, examples=[224])
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    resize: Literal["stretch"] = "stretch"
    colour: Literal["greyscale-repeated"] = "greyscale-repeated"


class BundleMeta(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str = Field(examples=["pneumonia-mobilenet"])
    version: str = Field(examples=["1.0.0"])
    labels: list[str] = Field(min_length=2, examples=[["NORMAL", "PNEUMONIA"]])
    # The screening finding, and the labels whose probabilities add up to it
    # (["PNEUMONIA"] for a two-label model; ["BACTERIAL", "VIRAL"] for a three-label one).
    positive_label: str = Field(examples=["PNEUMONIA"])
    positive_labels: list[str] = Field(min_length=1, examples=[["PNEUMONIA"]])
    negative_label: str = Field(examples=["NORMAL"])
    threshold: float = Field(ge=0.0, le=1.0, examples=[0.41])
    input: InputSpec
    output_name: Literal["probabilities"] = OUTPUT_NAME
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backbone: str = Field(examples=["mobilenet"])
    training_data: dict[str, Any] = Field(default_factory=dict)
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    tool_versions: dict[str, str] = Field(default_factory=dict)
    intended_use: str = INTENDED_USE
    # Written by `pneumoscreen calibrate` when the threshold was re-chosen on a site's own
    # labelled X-rays (docs/site-calibration.md); None for a bundle as exported.
    site_calibration: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _labels_consistent(self) -> BundleMeta:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        unknown = set(self.positive_labels) - set(self.labels)
        if unknown:
            raise ValueError(f"positive_labels not in labels: {sorted(unknown)}")
        if self.negative_label not in self.labels:
            raise ValueError("negative_label must be one of labels")
        if self.negative_label in self.positive_labels:
            raise ValueError("negative_label cannot also be positive")
        return self

    def positive_indices(self) -> list[int]:
        return [self.labels.index(label) for label in self.positive_labels]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(directory: Path, onnx_path: Path, meta: BundleMeta) -> BundleMeta:
    """Place model.onnx in `directory` and write model.json with its sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / MODEL_FILE
    if onnx_path.resolve() != target.resolve():
        target.write_bytes(onnx_path.read_bytes())
    meta = meta.model_copy(update={"onnx_sha256": sha256_file(target)})
    (directory / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
    return meta


def read_bundle(directory: Path, verify: bool = True) -> BundleMeta:
    """Read and validate model.json; with `verify`, check model.onnx against its sha256."""
    meta_path, model_path = directory / META_FILE, directory / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise BundleError(
            f"no model bundle in {directory}: expected {META_FILE} and {MODEL_FILE}. "
            "Train and export one (see README: 'Train on your own data'), "
            "or point MODEL_DIR at an existing bundle."
        )
    try:
        meta = BundleMeta.model_validate(json.loads(meta_path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise BundleError(f"{meta_path} is not a valid bundle description: {exc}") from None
    if meta.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{meta_path} has bundle format {meta.format_version}; "
            f"this version reads format {FORMAT_VERSION}"
        )
    if verify:
        actual = sha256_file(model_path)
        if actual != meta.onnx_sha256:
            raise BundleError(
                f"{model_path} does not match its recorded sha256 "
                f"(expected {meta.onnx_sha256[:12]}..., found {actual[:12]}...): "
                "the bundle is corrupt or was modified"
            )
    return meta
