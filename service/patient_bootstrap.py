"""Screening figures at a fixed threshold with patient-level bootstrap 95% intervals.

Images of one patient are correlated, so the bootstrap draws patients, not images: each
replicate draws, with replacement, as many patients of each class as the site has (a
stratified cluster bootstrap, so every replicate has both classes), and every drawn
patient brings all of their images. Intervals are the 2.5th and 97.5th percentiles of the
replicates. The threshold stays fixed: the intervals say how much the figures at this
operating point could move on another sample of the site's patients.

Pure numpy (serving install). AUC is the Mann-Whitney statistic (ties count one half),
the same number as scikit-learn's roc_auc_score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

DEFAULT_REPLICATES = 2000
DEFAULT_SEED = 0
# Replicates computed at once: bounds memory at (chunk x images) floats.
_CHUNK = 100


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high}


def auc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """P(score of a positive > score of a negative), ties one half; optionally weighted."""
    return float(
        _weighted_auc(
            np.asarray(y_true, dtype=bool),
            np.asarray(scores, dtype=np.float64),
            None if weights is None else np.asarray(weights)[None, :],
        )[0]
    )


def _weighted_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """AUC for each row of `weights` (replicates x images), or unweighted (one row)."""
    if weights is None:
        weights = np.ones((1, len(y)))
    weights = weights.astype(np.float64)
    negative_order = np.argsort(scores[~y], kind="stable")
    negative_scores = scores[~y][negative_order]
    negative_weights = weights[:, ~y][:, negative_order]
    # Weight of the negatives scored below / at most each positive's score.
    cumulative = np.concatenate(
        [np.zeros((len(weights), 1)), np.cumsum(negative_weights, axis=1)], axis=1
    )
    positive_scores = scores[y]
    below = cumulative[:, np.searchsorted(negative_scores, positive_scores, side="left")]
    at_most = cumulative[:, np.searchsorted(negative_scores, positive_scores, side="right")]
    positive_weights = weights[:, y]
    wins: NDArray[np.float64] = (positive_weights * (below + 0.5 * (at_most - below))).sum(axis=1)
    total: NDArray[np.float64] = positive_weights.sum(axis=1) * negative_weights.sum(axis=1)
    return wins / total


def patient_groups(patients: list[str], y_true: np.ndarray) -> list[tuple[bool, np.ndarray]]:
    """(stratum, image indices) per patient; the stratum is whether any image is positive."""
    by_patient: dict[str, list[int]] = {}
    for index, patient in enumerate(patients):
        by_patient.setdefault(patient, []).append(index)
    y = np.asarray(y_true, dtype=bool)
    return [(bool(y[idx].any()), np.array(idx)) for idx in by_patient.values()]


def bootstrap_figures(
    y_true: np.ndarray,
    scores: np.ndarray,
    patients: list[str],
    threshold: float,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Estimate]:
    """Sensitivity, specificity and AUC at `threshold` (screen positive when score >=
    threshold), each with its patient-level bootstrap 95% interval."""
    y = np.asarray(y_true, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if len(patients) != len(y) or len(scores) != len(y):
        raise ValueError("y_true, scores and patients must have one entry per image")
    if y.all() or not y.any():
        raise ValueError("both classes are needed")
    if replicates < 1:
        raise ValueError("replicates must be at least 1")
    flagged = scores >= threshold
    groups = patient_groups(patients, y)
    # Image -> patient column, so a replicate's patient counts become image weights.
    patient_of = np.empty(len(y), dtype=np.int64)
    for column, (_, indices) in enumerate(groups):
        patient_of[indices] = column
    strata = [
        np.array([c for c, (s, _) in enumerate(groups) if s == stratum])
        for stratum in (True, False)
    ]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {"sensitivity": [], "specificity": [], "auc": []}
    for start in range(0, replicates, _CHUNK):
        size = min(_CHUNK, replicates - start)
        counts = np.zeros((size, len(groups)))
        for members in strata:
            if members.size:
                picks = rng.multinomial(
                    members.size, np.full(members.size, 1 / members.size), size=size
                )
                counts[:, members] = picks
        weights = counts[:, patient_of]
        # nan (dropped below) only if a replicate drew no image of a class: possible just
        # when every image of that class belongs to a patient of the other stratum.
        positive_weight = weights[:, y].sum(axis=1)
        negative_weight = weights[:, ~y].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws["sensitivity"].append(weights[:, y & flagged].sum(axis=1) / positive_weight)
            draws["specificity"].append(weights[:, ~y & ~flagged].sum(axis=1) / negative_weight)
            draws["auc"].append(_weighted_auc(y, scores, weights))
    point = {
        "sensitivity": float(flagged[y].mean()),
        "specificity": float((~flagged[~y]).mean()),
        "auc": auc(y, scores),
    }
    figures = {}
    for name, value in point.items():
        low, high = np.nanpercentile(np.concatenate(draws[name]), [2.5, 97.5])
        figures[name] = Estimate(value, float(low), float(high))
    return figures
