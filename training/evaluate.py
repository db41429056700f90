"""Evaluate a training run at its chosen threshold and write its report.

    report/metrics.json         every split's AUC, accuracy, sensitivity, specificity,
                                precision, F1 and confusion matrix at the run's threshold
    report/roc.png              ROC curves with the operating points marked
    report/confusion_matrix.png the patient-level validation split (and _test.png, _official_val.png)

Splits: the patient-level validation split carved from train (recorded in split.json; the
one the threshold was chosen on), and the data folder's own `val/` and `test/` when present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.data import Sample, list_split, load_arrays, patient_id, split_samples
from training.metrics import binary_metrics, plot_confusion, plot_roc, positive_scores

Predict = Callable[[np.ndarray], np.ndarray]


def run_splits(run_dir: Path, data_root: Path, n_labels: int) -> dict[str, list[Sample]]:
    """The splits to report, in order: validation (by patient), official_val, test."""
    splits = {"validation": split_samples(run_dir, data_root, "validation", n_labels)}
    for name, folder in (("official_val", "val"), ("test", "test")):
        samples = list_split(data_root, folder, n_labels)
        if samples:
            splits[name] = samples
    return splits


def evaluate_predictions(
    splits: dict[str, list[Sample]],
    predict: Predict,
    run: dict,
    size: tuple[int, int],
    cache_dir: Path | None,
) -> dict[str, tuple[dict, np.ndarray, np.ndarray]]:
    """Metrics per split at the run's threshold, with the labels and scores behind them."""
    labels = tuple(run["labels"])
    positive_indices = [labels.index(p) for p in run["positive_labels"]]
    results = {}
    for name, samples in splits.items():
        x, y = load_arrays(samples, labels, size, cache_dir)
        scores = positive_scores(predict(x), positive_indices)
        y_positive = np.isin(y, positive_indices)
        metrics = binary_metrics(y_positive, scores, run["threshold"])
        metrics["patients"] = len({patient_id(s.path.name) for s in samples})
        results[name] = (metrics, y_positive, scores)
    return results


def evaluate_run(
    run_dir: Path,
    data_root: Path,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    model=None,
) -> dict:
    """Predict every split with the run's best Keras model and write report/."""
    import keras

    run = json.loads((run_dir / "run.json").read_text())
    if model is None:
        model = keras.models.load_model(run_dir / "model.keras")
    splits = run_splits(run_dir, data_root, len(run["labels"]))
    size = (run["input_size"], run["input_size"])

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=batch_size, verbose=0)

    results = evaluate_predictions(splits, predict, run, size, cache_dir)
    return write_report(run_dir / "report", run, results)


def validation_name(run: dict) -> str:
    """How a run's validation split was carved (runs before issue 13 used random patients)."""
    return {"patient": "patient-level", "acquisition": "acquisition-order (most recent ids)",
            "kfold": "k-fold (by patient)"}.get(run.get("validation", "patient"), "patient-level")


def write_report(report_dir: Path, run: dict, results: dict) -> dict:
    report_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"backbone": run["backbone"], "input_size": run["input_size"],
                  "labels": run["labels"]},
        "threshold": run["threshold"],
        "threshold_rule": (f"highest threshold with sensitivity >= {run['target_sensitivity']} "
                           f"on the {validation_name(run)} validation split"),
        "splits": {name: metrics for name, (metrics, _, _) in results.items()},
    }
    (report_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_roc({name: (y, s) for name, (_, y, s) in results.items()}, report_dir / "roc.png",
             {name: m for name, (m, _, _) in results.items()})
    for name, (metrics, _, _) in results.items():
        suffix = "" if name == "validation" else f"_{name}"
        title = {"validation": "validation split (by patient)", "official_val": "official val",
                 "test": "test"}.get(name, name)
        plot_confusion(metrics, report_dir / f"confusion_matrix{suffix}.png", title)
    for name, (metrics, _, _) in results.items():
        auc = "n/a" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        print(f"{name:13s} n={metrics['n']:5d} AUC {auc} sens {metrics['sensitivity']:.3f} "
              f"spec {metrics['specificity']:.3f} acc {metrics['accuracy']:.3f}")
    return report
