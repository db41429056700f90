"""Screening metrics, the operating threshold, and the report's figures.

Pure numpy/scikit-learn/matplotlib: no TensorFlow, so it is cheap to test and to reuse on
onnxruntime outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

# The threshold rule lives beside P(positive), so site calibration in the serving install
# (no scikit-learn) applies the very same rule; re-exported here for training's callers.
from service.patient_bootstrap import bootstrap_figures
from service.scoring import choose_threshold, positive_probability  # noqa: F401


def positive_scores(probabilities: np.ndarray, positive_indices: list[int]) -> np.ndarray:
    """P(positive finding) per image, exactly as the service computes it."""
    return positive_probability(probabilities, positive_indices)


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUC and the confusion-matrix metrics of `score >= threshold` (1 = positive)."""
    y_true = np.asarray(y_true).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, predicted, labels=[0, 1]).ravel()
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    f1 = _ratio(2 * precision * sensitivity, precision + sensitivity)
    both = 0 < y_true.sum() < len(y_true)
    return {
        "n": len(y_true),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        "auc": float(roc_auc_score(y_true, scores)) if both else None,
        "accuracy": _ratio(tp + tn, len(y_true)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
        "f1": f1,
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    operating_points: dict[str, dict] | None = None,
) -> None:
    """ROC curves, one per named split, with each split's operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    for name, (y_true, scores) in curves.items():
        if not 0 < np.sum(y_true) < len(y_true):
            continue
        fpr, tpr, _ = roc_curve(y_true, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y_true, scores):.3f})")
        point = (operating_points or {}).get(name)
        if point:
            ax.plot(1 - point["specificity"], point["sensitivity"], "o", color="black")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        title="ROC: pneumonia vs normal",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    _save_with_legend(plt, fig, ax, path, "lower right")


def plot_confusion(
    metrics: dict, path: Path, title: str, labels: tuple[str, str] = ("NORMAL", "PNEUMONIA")
) -> None:
    plt = _pyplot()
    cm = metrics["confusion_matrix"]
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=120)
    ax.imshow(grid, cmap="Blues")
    for (row, col), value in np.ndenumerate(grid):
        colour = "white" if value > grid.max() / 2 else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=colour, fontsize=14)
    ax.set_xticks([0, 1], [f"predicted {labels[0]}", f"predicted {labels[1]}"])
    ax.set_yticks([0, 1], [f"true {labels[0]}", f"true {labels[1]}"])
    ax.set_title(f"{title}\nthreshold {metrics['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


BOOTSTRAP_RESAMPLES = 1000


def bootstrap_intervals(
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    groups: list[str],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """95% intervals [low, high] of AUC, sensitivity and specificity at `threshold`,
    resampling PATIENTS (service.patient_bootstrap, the one the site calibration uses);
    None for all three when the split lacks a class."""
    y_true = np.asarray(y_true).astype(bool)
    if y_true.all() or not y_true.any():
        return {"auc": None, "sensitivity": None, "specificity": None}
    figures = bootstrap_figures(y_true, scores, groups, threshold, resamples, seed)
    return {
        name: [figures[name].low, figures[name].high]
        for name in ("auc", "sensitivity", "specificity")
    }


def plot_reliability(curves: dict[str, list[tuple[float, float, int]]], path: Path) -> None:
    """Reliability diagram: observed positive rate against mean P(positive) per bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=120)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    for name, points in curves.items():
        mean, observed, _ = zip(*points, strict=True)
        ax.plot(mean, observed, "o-", label=name)
    ax.set(
        xlabel="mean P(pneumonia) in bin",
        ylabel="observed share with pneumonia",
        title="Reliability (validation split)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    _save_with_legend(plt, fig, ax, path, "upper left")


def _save_with_legend(plt, fig, ax, path: Path, legend_loc: str) -> None:
    ax.legend(loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
