"""P(positive finding) from model outputs: one definition for training, export and serving.

The threshold is chosen on these exact values during training and compared against them
by the service, so an image on the boundary is decided the same way in both places.
"""

from __future__ import annotations

import numpy as np


def normalise(probabilities: np.ndarray) -> np.ndarray:
    """Rows of softmax output in float64, renormalised to sum to 1 (float32 rounding)."""
    values = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    totals = values.sum(axis=-1, keepdims=True)
    if not np.all(np.isfinite(totals)) or np.any(totals <= 0.0):
        raise ValueError("the model returned no usable probabilities")
    return values / totals


def positive_probability(probabilities: np.ndarray, positive_indices: list[int]) -> np.ndarray:
    """P(positive) per row: the sum of the positive labels' renormalised probabilities."""
    return np.clip(normalise(probabilities)[..., positive_indices].sum(axis=-1), 0.0, 1.0)
