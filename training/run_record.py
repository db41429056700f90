"""run.json: what a training run was asked and what it found, read and written here only.

    <run>/run.json    RunRecord below: the TrainConfig, the labels, the threshold chosen on
                      the validation split, data counts, history, and (once evaluated) the
                      temperature calibration that export folds into the bundle

`pneumoscreen train` writes it, `evaluate` adds `calibration`, `crossval`, `export` and
`quantize` read it. Runs written before a field existed still read: `validation` was
always "patient" then, `distribute` and `calibration` are None when not recorded, and a
config missing fields takes TrainConfig's defaults (which is what those runs used).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.calibration import Calibration
from training.config import TrainConfig

RUN_FILE = "run.json"

ValidationScheme = Literal["patient", "acquisition", "kfold"]  # training.data's schemes
_VALIDATION_NAMES: dict[str, str] = {
    "patient": "patient-level",
    "acquisition": "acquisition-order (most recent ids)",
    "kfold": "k-fold (by patient)",
}


# Fields of the record that repeat the config's.
_CONFIG_AT_TOP = ("backbone", "input_size", "target_sensitivity", "validation")


class RunRecordError(ValueError):
    """A run folder without a readable run.json."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class DataCounts(_Record):
    """The data folder and both sides of the run's split (split.json lists the files)."""

    root: str
    train_images: int
    validation_images: int
    train_patients: int
    validation_patients: int
    train_counts: dict[str, int]
    validation_counts: dict[str, int]


class DistributeInfo(_Record):
    """training.distribute.describe: the strategy asked for and the model's own."""

    strategy: str
    replicas: int
    devices: list[str]
    model_strategy: str


class RunCalibration(Calibration):
    """training.calibration.Calibration of the validation split, and the threshold on the
    calibrated scale that makes the same decisions as the run's threshold."""

    threshold: float
    # (mean score, observed positive rate, count) per bin: training.calibration
    reliability_before: list[tuple[float, float, int]]
    reliability_after: list[tuple[float, float, int]]


class EnsembleInfo(_Record):
    """training.ensemble: the member runs one model was built from, and how."""

    members: list[str] = Field(min_length=2)
    member_best_val_auc: list[float | None]
    combination: str


class RunRecord(_Record):
    """The fields in the order run.json has always listed them."""

    config: TrainConfig
    backbone: str
    input_size: int = Field(gt=0)
    labels: list[str] = Field(min_length=2)
    positive_label: str
    positive_labels: list[str] = Field(min_length=1)
    negative_label: str
    threshold: float = Field(ge=0.0, le=1.0)
    target_sensitivity: float
    validation: ValidationScheme = "patient"
    data: DataCounts
    distribute: DistributeInfo | None = None
    epochs_run: int
    best_val_auc: float | None = None  # None: no epoch ran (tests' untrained runs)
    history: list[dict[str, float]] = Field(default_factory=list)  # one row per epoch
    wall_time_s: float
    tool_versions: dict[str, str] = Field(default_factory=dict)
    calibration: RunCalibration | None = None  # written by training.evaluate
    ensemble: EnsembleInfo | None = None  # written by training.ensemble

    def positive_indices(self) -> list[int]:
        return [self.labels.index(label) for label in self.positive_labels]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.input_size, self.input_size)

    @property
    def validation_name(self) -> str:
        """How the validation split was carved, for reports and model cards."""
        return _VALIDATION_NAMES[self.validation]


def read_run(run_dir: Path) -> RunRecord:
    path = run_dir / RUN_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunRecordError(f"{path}: not a readable run record ({exc})") from exc
    if not isinstance(raw, dict):
        raise RunRecordError(f"{path}: not a run record (a JSON object)")
    config = raw.get("config")
    if isinstance(config, dict) and isinstance(raw.get("data"), dict):
        # Tests' untrained runs recorded only part of the config: what the record says
        # elsewhere fills the rest (then TrainConfig's defaults).
        known = {
            "data": raw["data"].get("root"),
            "out": str(run_dir),
            **{k: raw[k] for k in _CONFIG_AT_TOP if k in raw},
        }
        raw["config"] = {**known, **config}
    try:
        return RunRecord.model_validate(raw)
    except ValidationError as exc:
        raise RunRecordError(f"{path}: not a run record: {exc}") from exc


def write_run(run_dir: Path, record: RunRecord) -> Path:
    """run.json, indented; fields not recorded (None) are left out, as they always were."""
    fields = {k: v for k, v in record.model_dump(mode="json").items() if v is not None}
    path = run_dir / RUN_FILE
    path.write_text(json.dumps(fields, indent=2) + "\n")
    return path


def tool_versions() -> dict[str, str]:
    """The versions a run records: Python and the packages that shape a model."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in (
        "tensorflow-cpu",
        "tensorflow",
        "keras",
        "tf2onnx",
        "onnx",
        "onnxruntime",
        "numpy",
        "pillow",
        "scikit-learn",
        "pneumoscreen",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
