"""P(positive finding) from model outputs, and the rule that picks the operating threshold
on it: one definition for training, export, site calibration and serving (numpy only).

The threshold is chosen on these exact values during training and compared against them
by the service, so an image on the boundary is decided the same way in both places.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def normalise(probabilities: np.ndarray) -> NDArray[np.float64]:
    """Rows of softmax output in float64, renormalised to sum to 1 (float32 rounding)."""
    values = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    totals: NDArray[np.float64] = values.sum(axis=-1, keepdims=True)
    if not np.all(np.isfinite(totals)) or np.any(totals <= 0.0):
        raise ValueError("the model returned no usable probabilities")
    return values / totals


def positive_probability(
    probabilities: np.ndarray, positive_indices: list[int]
) -> NDArray[np.float64]:
    """P(positive) per row: the sum of the positive labels' renormalised probabilities."""
    summed: NDArray[np.float64] = normalise(probabilities)[..., positive_indices].sum(axis=-1)
    return np.clip(summed, 0.0, 1.0)


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity (score >= t) reaches the target.

    Among thresholds that miss at most (1 - target) of the positives, the highest one flags
    the fewest negatives, so it has the best specificity.
    """
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    if y_true.all() or not y_true.any():
        raise ValueError("both classes are needed to choose a threshold")
    positives = np.sort(scores[y_true])[::-1]
    # Keep at least ceil(target * n) positives at or above the threshold.
    needed = int(np.ceil(target_sensitivity * len(positives) - 1e-9))
    return float(positives[max(needed, 1) - 1])
