"""The model bundle: the only contract between training/export and serving.

    <bundle>/model.onnx   input "image": uint8 [batch, H, W, 3]
                          output "probabilities": float32 [batch, n_labels], rows sum to 1
                          format 2 also: "features" float32 [batch, D] (pooled backbone
                          features) and "cam" float32 [batch, h, w] (positive-class map)
    <bundle>/gate.npz     format 2: the input gate's statistics (service/gate.py)
    <bundle>/model.json   BundleMeta below, including the sha256 of every file above

docs/bundle.md is the human-readable spec of the same thing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

# 1: probabilities only. 2: + features and cam outputs, gate.npz, files_sha256.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MODEL_FILE = "model.onnx"
META_FILE = "model.json"
# Final: their literal types are also the only values BundleMeta accepts for them.
GATE_FILE: Final = "gate.npz"
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "probabilities"
# The validation split's binary metrics (training.metrics.binary_metrics' names) that
# export copies into model.json's `validation_metrics`, beside the threshold rule and the
# 95 % intervals; GET /model shows them.
VALIDATION_METRIC_NAMES = (
    "auc",
    "sensitivity",
    "specificity",
    "accuracy",
    "precision",
    "f1",
    "n",
    "n_positive",
    "confusion_matrix",
)
FEATURES_NAME = "features"
CAM_NAME = "cam"
EXPLAIN_OUTPUTS = (FEATURES_NAME, CAM_NAME)
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


class GateInfo(BaseModel):
    """The input gate of a format 2 bundle: what it is and how it was measured.

    The statistics themselves (class means, shared precision matrix) are in `file`."""

    file: Literal["gate.npz"] = GATE_FILE
    method: str = Field(examples=["mahalanobis-shared-ledoit-wolf"])
    classes: list[str] = Field(
        min_length=2,
        examples=[["NORMAL", "PNEUMONIA", "ROTATED_90", "ROTATED_180", "ROTATED_270"]],
        description="Gaussian classes in the order of gate.npz `means`; ROTATED_<deg> are "
        "training X-rays turned by that many degrees counter-clockwise.",
    )
    threshold: float = Field(
        gt=0, description="Largest accepted Mahalanobis distance to the nearest upright class."
    )
    rotated_threshold: float = Field(
        gt=0, description="Largest distance to the nearest rotated class for `rotated_image`."
    )
    target_acceptance: float = Field(gt=0, le=1, examples=[0.995])
    feature_dim: int = Field(gt=0, examples=[1024])
    components: int = Field(
        gt=0,
        examples=[64],
        description="Principal components of the features the Gaussians live in.",
    )
    fitted_on: dict[str, Any] = Field(default_factory=dict)
    acceptance: dict[str, Any] = Field(
        default_factory=dict,
        description="Measured at export: share of the validation "
        "split's X-rays the gate accepts, and of their rotations it refuses.",
    )


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
    # Format 2: the ONNX outputs, the sha256 of every file the service reads, the gate.
    outputs: list[str] = Field(default_factory=lambda: [OUTPUT_NAME])
    files_sha256: dict[str, str] = Field(default_factory=dict)
    gate: GateInfo | None = None
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
        if self.format_version >= 2:
            missing = {OUTPUT_NAME, *EXPLAIN_OUTPUTS} - set(self.outputs)
            if missing:
                raise ValueError(f"format 2 needs the outputs {sorted(missing)}")
            if self.gate is None:
                raise ValueError("format 2 needs a gate")
        return self

    @property
    def has_explain_outputs(self) -> bool:
        """features and cam are in the graph: the gate and heatmaps can work."""
        return self.format_version >= 2 and set(EXPLAIN_OUTPUTS) <= set(self.outputs)

    def bundle_files(self) -> list[str]:
        """The files whose sha256 model.json records and read_bundle verifies."""
        return [MODEL_FILE] + ([self.gate.file] if self.gate is not None else [])

    def positive_indices(self) -> list[int]:
        return [self.labels.index(label) for label in self.positive_labels]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(
    directory: Path, onnx_path: Path, meta: BundleMeta, gate_path: Path | None = None
) -> BundleMeta:
    """Place model.onnx (and gate.npz) in `directory`, write model.json with their sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / MODEL_FILE
    if onnx_path.resolve() != target.resolve():
        target.write_bytes(onnx_path.read_bytes())
    if gate_path is not None and meta.gate is not None:
        gate_target = directory / meta.gate.file
        if gate_path.resolve() != gate_target.resolve():
            gate_target.write_bytes(gate_path.read_bytes())
    update: dict[str, Any] = {"onnx_sha256": sha256_file(target)}
    if meta.format_version >= 2:
        update["files_sha256"] = {
            name: sha256_file(directory / name) for name in meta.bundle_files()
        }
    meta = meta.model_copy(update=update)
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
    if meta.format_version not in READABLE_FORMATS:
        raise BundleError(
            f"{meta_path} has bundle format {meta.format_version}; "
            f"this version reads formats {', '.join(map(str, READABLE_FORMATS))}"
        )
    expected = {MODEL_FILE: meta.onnx_sha256}
    if meta.format_version >= 2:
        missing = [name for name in meta.bundle_files() if name not in meta.files_sha256]
        if missing or meta.files_sha256.get(MODEL_FILE) != meta.onnx_sha256:
            raise BundleError(
                f"{meta_path}: files_sha256 must cover {meta.bundle_files()} "
                "and agree with onnx_sha256"
            )
        expected = {name: meta.files_sha256[name] for name in meta.bundle_files()}
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"no {name} in the bundle {directory} (model.json lists it)")
        if not verify:
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"{path} does not match its recorded sha256 "
                f"(expected {digest[:12]}..., found {actual[:12]}...): "
                "the bundle is corrupt or was modified"
            )
    return meta
