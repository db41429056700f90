"""Evaluate a training run at its chosen threshold and write its report.

    report/metrics.json         every split's AUC, accuracy, sensitivity, specificity,
                                precision, F1 and confusion matrix at the run's threshold
    report/roc.png              ROC curves with the operating points marked
    report/confusion_matrix.png the patient-level validation split (and _test.png,
                                _official_val.png)

Splits: the patient-level validation split carved from train (recorded in split.json; the
one the threshold was chosen on), and the data folder's own `val/` and `test/` when present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.calibration import calibrate, reliability_curve, scale_probabilities
from training.data import Sample, list_split, load_arrays, patient_id, split_samples
from training.metrics import (
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
    plot_confusion,
    plot_reliability,
    plot_roc,
    positive_scores,
)
from training.run_record import RunCalibration, RunRecord, read_run, write_run

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class KnownProbabilities:
    """The model's outputs for one split that the caller has already computed (train and
    ensemble predict the validation split to choose the threshold), with the images they
    are for: evaluation uses them instead of predicting the split again, but only for the
    same images in the same order."""

    paths: list[Path]
    probabilities: np.ndarray


def run_splits(run_dir: Path, data_root: Path, n_labels: int) -> dict[str, list[Sample]]:
    """The splits to report, in order: validation (by patient), official_val, test."""
    splits = {"validation": split_samples(run_dir, data_root, "validation", n_labels)}
    for name, folder in (("official_val", "val"), ("test", "test")):
        samples = list_split(data_root, folder, n_labels)
        if samples:
            splits[name] = samples
    return splits


@dataclass(frozen=True)
class SplitResult:
    metrics: dict  # binary_metrics at the run's threshold, + patients and 95% intervals
    y_positive: np.ndarray  # per image: has the positive finding
    scores: np.ndarray  # per image: P(positive)
    probabilities: np.ndarray  # the model's output rows
    label_indices: np.ndarray


def evaluate_predictions(
    splits: dict[str, list[Sample]],
    predict: Predict,
    record: RunRecord,
    cache_dir: Path | None,
    known: dict[str, KnownProbabilities] | None = None,
) -> dict[str, SplitResult]:
    """Metrics per split at the run's threshold, with the labels and scores behind them."""
    labels = tuple(record.labels)
    positive_indices = record.positive_indices()
    results = {}
    for name, samples in splits.items():
        x, y = load_arrays(samples, labels, record.image_size, cache_dir)
        given = (known or {}).get(name)
        if given is not None and given.paths == [s.path for s in samples]:
            probabilities = given.probabilities
        else:
            probabilities = predict(x)
        scores = positive_scores(probabilities, positive_indices)
        y_positive = np.isin(y, positive_indices)
        metrics = binary_metrics(y_positive, scores, record.threshold)
        patients = [patient_id(s.path.name) for s in samples]
        metrics["patients"] = len(set(patients))
        metrics["intervals_95"] = bootstrap_intervals(
            y_positive, scores, record.threshold, patients
        )
        results[name] = SplitResult(metrics, y_positive, scores, probabilities, y)
    return results


def evaluate_run(
    run_dir: Path,
    data_root: Path,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    model=None,
    known: dict[str, KnownProbabilities] | None = None,
) -> dict:
    """`pneumoscreen evaluate`: evaluate_model on the run's record and best Keras model,
    then record the calibration in run.json (for export)."""
    from training.model import load_trained

    record = read_run(run_dir)
    if model is None:
        model = load_trained(run_dir / "model.keras")
    record, report = evaluate_model(run_dir, record, data_root, model, batch_size, cache_dir, known)
    write_run(run_dir, record)
    return report


def evaluate_model(
    run_dir: Path,
    record: RunRecord,
    data_root: Path,
    model,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    known: dict[str, KnownProbabilities] | None = None,
) -> tuple[RunRecord, dict]:
    """Predict every split (but those in `known`), fit the temperature on the validation
    split and write report/; returns the record with its calibration, and the report."""
    splits = run_splits(run_dir, data_root, len(record.labels))

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0)

    results = evaluate_predictions(splits, predict, record, cache_dir, known)
    record = record.model_copy(update={"calibration": calibrate_run(record, results["validation"])})
    return record, write_report(run_dir / "report", record, results)


def calibrate_run(record: RunRecord, validation: SplitResult) -> RunCalibration:
    """Temperature and the threshold it maps the run's threshold to (same decisions)."""
    positive_indices = record.positive_indices()

    def scores_of(probabilities: np.ndarray) -> np.ndarray:
        return positive_scores(probabilities, positive_indices)

    fit = calibrate(
        validation.probabilities,
        validation.label_indices,
        validation.y_positive,
        scores_of,
        fitted_on=f"the {record.validation_name} validation split",
    )
    calibrated = scores_of(scale_probabilities(validation.probabilities, fit.temperature))
    threshold = choose_threshold(validation.y_positive, calibrated, record.target_sensitivity)
    return RunCalibration(
        **fit.model_dump(),
        threshold=threshold,
        reliability_before=reliability_curve(validation.y_positive, validation.scores),
        reliability_after=reliability_curve(validation.y_positive, calibrated),
    )


def write_report(report_dir: Path, record: RunRecord, results: dict[str, SplitResult]) -> dict:
    report_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {
            "backbone": record.backbone,
            "input_size": record.input_size,
            "labels": record.labels,
        },
        "threshold": record.threshold,
        "threshold_rule": (
            f"highest threshold with sensitivity >= {record.target_sensitivity} "
            f"on the {record.validation_name} validation split"
        ),
        "splits": {name: result.metrics for name, result in results.items()},
    }
    calibration = record.calibration
    if calibration:
        report["calibration"] = calibration.model_dump(mode="json")
        plot_reliability(
            {
                "as trained": calibration.reliability_before,
                f"temperature {calibration.temperature:.2f}": calibration.reliability_after,
            },
            report_dir / "reliability.png",
        )
    (report_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_roc(
        {name: (r.y_positive, r.scores) for name, r in results.items()},
        report_dir / "roc.png",
        {name: r.metrics for name, r in results.items()},
    )
    for name, result in results.items():
        suffix = "" if name == "validation" else f"_{name}"
        title = {
            "validation": f"validation split ({record.validation_name})",
            "official_val": "official val",
            "test": "test",
        }.get(name, name)
        plot_confusion(result.metrics, report_dir / f"confusion_matrix{suffix}.png", title)
    for name, result in results.items():
        metrics = result.metrics
        auc = "n/a" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        ci = metrics["intervals_95"]["auc"]
        ci_text = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(
            f"{name:13s} n={metrics['n']:5d} AUC {auc}{ci_text} sens "
            f"{metrics['sensitivity']:.3f} spec {metrics['specificity']:.3f} "
            f"acc {metrics['accuracy']:.3f}"
        )
    if calibration:
        print(
            f"calibration: T = {calibration.temperature:.3f}, ECE "
            f"{calibration.ece_before:.4f} -> {calibration.ece_after:.4f}, threshold "
            f"{record.threshold:.4f} -> {calibration.threshold:.4f}"
        )
    return report
