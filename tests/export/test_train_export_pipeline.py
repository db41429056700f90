"""train -> evaluate -> export -> onnxruntime, on real X-rays, small enough for CI.

Uses the committed fixture X-rays (a few dozen images of the real data set). With
../shared/weights beside the checkout the backbone starts from the real ImageNet
MobileNet weights, so its outputs differ between images and the parity check is a real
one; without it the backbone is random ("none"), which still exercises every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscreen.cli import app
from service.bundle import read_bundle
from service.preprocessing import load_model_input
from tests.support.run_factory import FIXTURE_DATA, mobilenet_weights, tiny_train_args
from training.calibration import scale_probabilities
from training.run_record import read_run

pytestmark = pytest.mark.slow

DATA = FIXTURE_DATA
FIXTURES = DATA.parent
SIZE = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pipeline")
    run_dir, bundle_dir = base / "run", base / "bundle"
    weights = mobilenet_weights()
    runner = CliRunner()
    result = runner.invoke(
        app,
        tiny_train_args(
            DATA,
            run_dir,
            base / "cache",
            backbone="mobilenet",
            weights=weights,
            input_size=SIZE,
            val_fraction=0.25,
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    # train evaluates too, and its last write of run.json keeps evaluate's calibration.
    assert read_run(run_dir).calibration is not None
    cache = ["--cache-dir", str(base / "cache")]
    result = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--data", str(DATA), *cache])
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(
        app,
        [
            "export",
            "--run",
            str(run_dir),
            "--data",
            str(DATA),
            "--out",
            str(bundle_dir),
            "--version",
            "0.0.1-test",
            *cache,
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"run": run_dir, "bundle": bundle_dir, "weights": Path(weights)}


def test_split_has_no_patient_on_both_sides(trained: dict[str, Path]) -> None:
    from training.data import patient_id

    split = json.loads((trained["run"] / "split.json").read_text())
    train_patients = {patient_id(p) for p in split["train"]}
    val_patients = {patient_id(p) for p in split["validation"]}
    assert split["validation"] and split["train"]
    assert not train_patients & val_patients
    assert len(split["train"]) + len(split["validation"]) == 32


def test_report_files_hold_sane_values(trained: dict[str, Path]) -> None:
    report_dir = trained["run"] / "report"
    for name in ("metrics.json", "roc.png", "confusion_matrix.png"):
        assert (report_dir / name).is_file()
    report = json.loads((report_dir / "metrics.json").read_text())
    assert set(report["splits"]) == {"validation", "official_val"}
    validation = report["splits"]["validation"]
    cm = validation["confusion_matrix"]
    assert cm["tn"] + cm["fp"] + cm["fn"] + cm["tp"] == validation["n"] == 8
    for key in ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert 0.0 <= validation[key] <= 1.0
    # The threshold rule: on the split it was chosen on, sensitivity reaches the target.
    assert validation["sensitivity"] >= 0.95
    run = read_run(trained["run"])
    assert 0.0 <= run.threshold <= 1.0
    assert report["threshold"] == run.threshold


def test_bundle_loads_and_matches_keras(trained: dict[str, Path]) -> None:
    from service.onnx_session import make_session
    from training.model import load_trained

    meta = read_bundle(trained["bundle"])  # sha256 verified, as at service start-up
    assert meta.labels == ["NORMAL", "PNEUMONIA"] and meta.input.height == SIZE
    assert meta.validation_metrics["n"] == 8
    assert (trained["bundle"] / "MODEL_CARD.md").read_text().count("not a diagnosis") >= 1
    assert (trained["bundle"] / "report" / "roc.png").is_file()

    images = np.stack(
        [
            load_model_input(p.read_bytes(), SIZE, SIZE)
            for p in sorted((FIXTURES / "fullres").iterdir())
        ]
    )
    session = make_session(trained["bundle"] / "model.onnx")
    assert session.get_inputs()[0].name == "image"
    assert session.get_inputs()[0].type == "tensor(uint8)"
    onnx_probabilities = session.run(["probabilities"], {"image": images})[0]
    keras_probabilities = load_trained(trained["run"] / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(onnx_probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The bundle serves the trained model with its fitted temperature folded into the head:
    # softmax(log(p) / T) of the Keras probabilities, and the threshold mapped to match.
    calibration = read_run(trained["run"]).calibration
    assert calibration is not None
    expected = scale_probabilities(keras_probabilities, calibration.temperature)
    assert np.max(np.abs(onnx_probabilities - expected)) < 1e-4
    assert meta.threshold == pytest.approx(calibration.threshold)
    assert meta.validation_metrics["calibration"]["temperature"] == calibration.temperature
    if trained["weights"].is_file():
        # Real ImageNet features: different X-rays get different scores, so the parity
        # above compared something that varies.
        assert np.ptp(onnx_probabilities[:, 1]) > 1e-4


def test_three_label_mode_trains_and_exports(tmp_path: Path) -> None:
    runner = CliRunner()
    run_dir, bundle_dir = tmp_path / "run3", tmp_path / "bundle3"
    result = runner.invoke(
        app,
        tiny_train_args(
            DATA,
            run_dir,
            tmp_path / "cache",
            input_size=64,
            labels=3,
            epochs_finetune=0,
            val_fraction=0.25,
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(
        app,
        [
            "export",
            "--run",
            str(run_dir),
            "--data",
            str(DATA),
            "--out",
            str(bundle_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = read_bundle(bundle_dir)
    assert meta.labels == ["NORMAL", "BACTERIAL", "VIRAL"]
    assert meta.positive_labels == ["BACTERIAL", "VIRAL"] and meta.positive_label == "PNEUMONIA"
