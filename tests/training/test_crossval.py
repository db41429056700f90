"""`pneumoscreen crossval` pools k-fold members: tiny untrained folds on the fixture X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscreen.cli import app
from tests.support.run_factory import tiny_train_args
from training.data import list_split

pytestmark = pytest.mark.slow

DATA = Path(__file__).parents[1] / "fixtures" / "chest_xray"


def _train_fold(runner: CliRunner, out: Path, fold: int, cache: Path) -> None:
    result = runner.invoke(
        app,
        tiny_train_args(
            DATA, out, cache, epochs_finetune=0, validation="kfold", folds=2, fold=fold
        ),
    )
    assert result.exit_code == 0, result.output


def test_pooled_report_scores_every_training_image_once(tmp_path: Path) -> None:
    runner = CliRunner()
    runs = [tmp_path / f"fold{i}" for i in range(2)]
    for fold, run in enumerate(runs):
        _train_fold(runner, run, fold, tmp_path / "cache")
    out = tmp_path / "crossval"
    args = [
        "crossval",
        "--data",
        str(DATA),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    for run in runs:
        args += ["--run", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "crossval.json").read_text())

    held_out = [
        p for run in runs for p in json.loads((run / "split.json").read_text())["validation"]
    ]
    train_images = list_split(DATA, "train")
    assert sorted(held_out) == sorted(str(s.path.relative_to(DATA)) for s in train_images)
    assert (
        report["pooled"]["n"]
        == len(train_images)
        == sum(f["own_threshold"]["n"] for f in report["folds"])
    )
    # The rule holds on the pooled scores, and each fold is also shown at that threshold.
    assert report["pooled"]["sensitivity"] >= 0.95
    for fold in report["folds"]:
        assert fold["pooled_threshold"]["threshold"] == report["pooled"]["threshold"]
        assert fold["own_threshold"]["threshold"] == fold["threshold"]
    positives = sum(
        f["pooled_threshold"]["confusion_matrix"]["tp"]
        + f["pooled_threshold"]["confusion_matrix"]["fn"]
        for f in report["folds"]
    )
    assert positives == report["pooled"]["n_positive"]
    assert np.isfinite(report["pooled"]["auc"])


def test_a_run_that_is_not_a_fold_is_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, tiny_train_args(DATA, run, tmp_path / "cache", epochs_finetune=0))
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["crossval", "--data", str(DATA), "--run", str(run), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0
    assert "not a k-fold member" in str(result.exception)
