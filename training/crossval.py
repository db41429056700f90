"""Pool the folds of a k-fold cross-validation: `pneumoscreen crossval --run runs/f0 ...`.

Each fold is an ordinary run (`pneumoscreen train --validation kfold --folds k --fold i`),
trained on k-1 folds of patients and scored here on the fold it held out, so every training
image gets exactly one out-of-fold score. The report (`<out>/crossval.json`) gives:

- per fold: AUC, and sensitivity/specificity at the fold's own threshold, with patient-level
  95% bootstrap intervals;
- pooled out-of-fold: the same, at the threshold the rule picks on all scores together;
- every fold at that pooled threshold: how far one operating point moves between folds of
  patients, which is what a shipped threshold meets on new patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.data import load_arrays, split_samples
from training.metrics import binary_metrics, bootstrap_intervals, choose_threshold, positive_scores
from training.run_record import RunRecord, read_run


def _fold_scores(
    run_dir: Path, data_root: Path, cache_dir: Path | None, batch_size: int
) -> tuple[RunRecord, np.ndarray, np.ndarray, list[str]]:
    from training.model import load_trained

    run = read_run(run_dir)
    if run.validation != "kfold":
        raise ValueError(
            f"{run_dir} is not a k-fold member (trained with --validation {run.validation})"
        )
    labels = tuple(run.labels)
    samples = split_samples(run_dir, data_root, "validation", len(labels))
    x, y = load_arrays(samples, labels, run.image_size, cache_dir)
    model = load_trained(run_dir / "model.keras")
    positive = run.positive_indices()
    scores = positive_scores(model.predict(x, batch_size=batch_size, verbose=0), positive)
    return run, np.isin(y, positive), scores, [s.patient for s in samples]


def _figures(y: np.ndarray, scores: np.ndarray, threshold: float, patients: list[str]) -> dict:
    metrics = binary_metrics(y, scores, threshold)
    metrics["patients"] = len(set(patients))
    metrics["intervals_95"] = bootstrap_intervals(y, scores, threshold, patients)
    return metrics


def crossval_report(
    run_dirs: list[Path],
    data_root: Path,
    out: Path,
    cache_dir: Path | None = None,
    batch_size: int = 32,
) -> dict:
    folds, pooled_y, pooled_scores, pooled_patients = [], [], [], []
    target = None
    for run_dir in run_dirs:
        run, y, scores, patients = _fold_scores(run_dir, data_root, cache_dir, batch_size)
        if target is None:
            target = run.target_sensitivity
        elif run.target_sensitivity != target:
            raise ValueError("the folds were trained for different target sensitivities")
        folds.append(
            {
                "run": run_dir.name,
                "fold": run.config.fold,
                "folds": run.config.folds,
                "threshold": run.threshold,
                "own_threshold": _figures(y, scores, run.threshold, patients),
                "_data": (y, scores, patients),
            }
        )
        pooled_y.append(y)
        pooled_scores.append(scores)
        pooled_patients.extend(patients)
    assert target is not None, "no runs given"
    y_all, s_all = np.concatenate(pooled_y), np.concatenate(pooled_scores)
    pooled_threshold = choose_threshold(y_all, s_all, target)
    for fold in folds:
        y, scores, patients = fold.pop("_data")
        fold["pooled_threshold"] = _figures(y, scores, pooled_threshold, patients)
    report = {
        "rule": f"highest threshold with sensitivity >= {target} on the pooled out-of-fold scores",
        "folds_used": len(folds),
        "pooled": {
            "threshold": pooled_threshold,
            **_figures(y_all, s_all, pooled_threshold, pooled_patients),
        },
        "folds": folds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"pooled out-of-fold ({len(folds)} folds, n={len(y_all)}): AUC "
        f"{report['pooled']['auc']:.4f}, threshold {pooled_threshold:.4f}"
    )
    for fold in folds:
        own, pooled = fold["own_threshold"], fold["pooled_threshold"]
        print(
            f"fold {fold['fold']}: AUC {own['auc']:.4f}; own threshold "
            f"{fold['threshold']:.4f}: sens {own['sensitivity']:.3f} spec "
            f"{own['specificity']:.3f}; pooled threshold: sens {pooled['sensitivity']:.3f} "
            f"spec {pooled['specificity']:.3f}"
        )
    return report
