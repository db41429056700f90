"""run.json through training.run_record: one reader, one writer, older runs still read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from training.config import TrainConfig
from training.data import VALIDATION_SCHEMES
from training.run_record import (
    RUN_FILE,
    RunRecordError,
    ValidationScheme,
    read_run,
    write_run,
)

DATA_COUNTS = {
    "root": "/data/chest_xray",
    "train_images": 30,
    "validation_images": 10,
    "train_patients": 25,
    "validation_patients": 8,
    "train_counts": {"NORMAL": 10, "PNEUMONIA": 20},
    "validation_counts": {"NORMAL": 4, "PNEUMONIA": 6},
}
CALIBRATION = {
    "method": "temperature scaling (NLL)",
    "temperature": 0.47,
    "fitted_on": "the validation",
    "n": 10,
    "nll_before": 0.08,
    "nll_after": 0.05,
    "ece_before": 0.05,
    "ece_after": 0.02,
    "threshold": 0.7,
    "reliability_before": [[0.1, 0.0, 4], [0.9, 1.0, 6]],
    "reliability_after": [[0.05, 0.0, 4], [0.95, 1.0, 6]],
}


def _current_record(run_dir: Path) -> dict:
    """A run.json as `pneumoscreen train` + `evaluate` write it now."""
    config = json.loads(
        json.dumps(
            TrainConfig(
                data=Path("/data/chest_xray"), out=run_dir, validation="kfold", fold=1
            ).__dict__,
            default=str,
        )
    )
    return {
        "config": config,
        "backbone": "mobilenet",
        "input_size": 224,
        "labels": ["NORMAL", "PNEUMONIA"],
        "positive_label": "PNEUMONIA",
        "positive_labels": ["PNEUMONIA"],
        "negative_label": "NORMAL",
        "threshold": 0.6,
        "target_sensitivity": 0.95,
        "validation": "kfold",
        "data": DATA_COUNTS,
        "distribute": {
            "strategy": "MirroredStrategy",
            "replicas": 1,
            "devices": ["/job:localhost/replica:0/task:0/device:CPU:0"],
            "model_strategy": "MirroredStrategy",
        },
        "epochs_run": 2,
        "best_val_auc": 0.9,
        "history": [{"loss": 0.5, "val_auc": 0.8}, {"loss": 0.4, "val_auc": 0.9}],
        "wall_time_s": 12.5,
        "tool_versions": {"python": "3.11.7"},
        "calibration": CALIBRATION,
    }


def test_a_current_record_is_written_back_unchanged(tmp_path: Path) -> None:
    raw = _current_record(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    record = read_run(tmp_path)
    assert record.config.fold == 1 and record.config.data == Path("/data/chest_xray")
    assert record.distribute is not None and record.distribute.replicas == 1
    assert record.calibration is not None and record.calibration.temperature == 0.47
    assert record.positive_indices() == [1] and record.image_size == (224, 224)
    out = tmp_path / "again"
    out.mkdir()
    write_run(out, record)
    assert (out / RUN_FILE).read_text() == (tmp_path / RUN_FILE).read_text()


def test_a_record_of_an_older_run_reads_with_the_defaults_it_ran_with(tmp_path: Path) -> None:
    raw = _current_record(tmp_path)
    for key in ("validation", "distribute", "calibration"):
        del raw[key]
    for key in ("validation", "distribute", "intensity_stretch"):
        del raw["config"][key]
    (tmp_path / RUN_FILE).write_text(json.dumps(raw))
    record = read_run(tmp_path)
    assert record.validation == "patient" and record.validation_name == "patient-level"
    assert record.distribute is None and record.calibration is None
    assert record.config.distribute == "none" and record.config.intensity_stretch is False
    write_run(tmp_path, record)
    written = json.loads((tmp_path / RUN_FILE).read_text())
    assert "distribute" not in written and "calibration" not in written  # not made up


def test_a_partial_config_is_completed_from_the_record(tmp_path: Path) -> None:
    """tests/support/run_factory.py's untrained runs used to record only the seed and weights."""
    raw = _current_record(tmp_path)
    raw["config"] = {"seed": 1, "weights": "none"}
    raw["input_size"] = 96
    (tmp_path / RUN_FILE).write_text(json.dumps(raw))
    config = read_run(tmp_path).config
    assert (config.seed, config.weights, config.input_size) == (1, "none", 96)
    assert config.data == Path(DATA_COUNTS["root"]) and config.out == tmp_path


@pytest.mark.parametrize("content", ["not json", "[]", json.dumps({"backbone": "mobilenet"})])
def test_a_broken_record_names_its_file(tmp_path: Path, content: str) -> None:
    (tmp_path / RUN_FILE).write_text(content)
    with pytest.raises(RunRecordError, match=str(tmp_path / RUN_FILE)):
        read_run(tmp_path)


def test_a_missing_record_names_its_file(tmp_path: Path) -> None:
    with pytest.raises(RunRecordError, match=RUN_FILE):
        read_run(tmp_path)


def test_the_record_knows_every_validation_scheme_of_training_data() -> None:
    assert set(get_args(ValidationScheme)) == set(VALIDATION_SCHEMES)
