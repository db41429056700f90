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

Predict = Callable[[np.ndarray], np.ndarray]


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
    run: dict,
    size: tuple[int, int],
    cache_dir: Path | None,
) -> dict[str, SplitResult]:
    """Metrics per split at the run's threshold, with the labels and scores behind them."""
    labels = tuple(run["labels"])
    positive_indices = [labels.index(p) for p in run["positive_labels"]]
    results = {}
    for name, samples in splits.items():
        x, y = load_arrays(samples, labels, size, cache_dir)
        probabilities = predict(x)
        scores = positive_scores(probabilities, positive_indices)
        y_positive = np.isin(y, positive_indices)
        metrics = binary_metrics(y_positive, scores, run["threshold"])
        patients = [patient_id(s.path.name) for s in samples]
        metrics["patients"] = len(set(patients))
        metrics["intervals_95"] = bootstrap_intervals(y_positive, scores, run["threshold"],
                                                      patients)
        results[name] = SplitResult(metrics, y_positive, scores, probabilities, y)
    return results


def evaluate_run(
    run_dir: Path,
    data_root: Path,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    model=None,
) -> dict:
    """Predict every split with the run's best Keras model, fit the temperature on the
    validation split (recorded in run.json for export) and write report/."""
    from training.model import load_trained

    run_path = run_dir / "run.json"
    run = json.loads(run_path.read_text())
    if model is None:
        model = load_trained(run_dir / "model.keras")
    splits = run_splits(run_dir, data_root, len(run["labels"]))
    size = (run["input_size"], run["input_size"])

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0)

    results = evaluate_predictions(splits, predict, run, size, cache_dir)
    run["calibration"] = calibrate_run(run, results["validation"])
    run_path.write_text(json.dumps(run, indent=2) + "\n")
    return write_report(run_dir / "report", run, results)


def calibrate_run(run: dict, validation: SplitResult) -> dict:
    """Temperature and the threshold it maps the run's threshold to (same decisions)."""
    labels = tuple(run["labels"])
    positive_indices = [labels.index(p) for p in run["positive_labels"]]

    def scores_of(probabilities: np.ndarray) -> np.ndarray:
        return positive_scores(probabilities, positive_indices)

    fit = calibrate(validation.probabilities, validation.label_indices, validation.y_positive,
                    scores_of, fitted_on=f"the {validation_name(run)} validation split")
    calibrated = scores_of(scale_probabilities(validation.probabilities, fit.temperature))
    threshold = choose_threshold(validation.y_positive, calibrated, run["target_sensitivity"])
    return {**fit.to_json(), "threshold": threshold,
            "reliability_before": reliability_curve(validation.y_positive, validation.scores),
            "reliability_after": reliability_curve(validation.y_positive, calibrated)}


def validation_name(run: dict) -> str:
    """How a run's validation split was carved (runs before issue 13 used random patients)."""
    return {"patient": "patient-level", "acquisition": "acquisition-order (most recent ids)",
            "kfold": "k-fold (by patient)"}.get(run.get("validation", "patient"), "patient-level")


def write_report(report_dir: Path, run: dict, results: dict[str, SplitResult]) -> dict:
    report_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"backbone": run["backbone"], "input_size": run["input_size"],
                  "labels": run["labels"]},
        "threshold": run["threshold"],
        "threshold_rule": (f"highest threshold with sensitivity >= {run['target_sensitivity']} "
                           f"on the {validation_name(run)} validation split"),
        "splits": {name: result.metrics for name, result in results.items()},
    }
    calibration = run.get("calibration")
    if calibration:
        report["calibration"] = calibration
        plot_reliability({"as trained": calibration["reliability_before"],
                          f"temperature {calibration['temperature']:.2f}":
                              calibration["reliability_after"]},
                         report_dir / "reliability.png")
    (report_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_roc({name: (r.y_positive, r.scores) for name, r in results.items()},
             report_dir / "roc.png", {name: r.metrics for name, r in results.items()})
    for name, result in results.items():
        suffix = "" if name == "validation" else f"_{name}"
        title = {"validation": f"validation split ({validation_name(run)})",
                 "official_val": "official val", "test": "test"}.get(name, name)
        plot_confusion(result.metrics, report_dir / f"confusion_matrix{suffix}.png", title)
    for name, result in results.items():
        metrics = result.metrics
        auc = "n/a" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        ci = metrics["intervals_95"]["auc"]
        ci_text = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"{name:13s} n={metrics['n']:5d} AUC {auc}{ci_text} sens "
              f"{metrics['sensitivity']:.3f} spec {metrics['specificity']:.3f} "
              f"acc {metrics['accuracy']:.3f}")
    if calibration:
        print(f"calibration: T = {calibration['temperature']:.3f}, ECE "
              f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}, threshold "
              f"{run['threshold']:.4f} -> {calibration['threshold']:.4f}")
    return report
