"""Temperature scaling of a softmax classifier, and how calibrated its probabilities are.

The model's head is linear, so dividing its logits by a temperature T is the same as dividing
the Dense layer's kernel and bias by T: export folds T into the weights, the ONNX graph stays
the same shape and `/predict` returns calibrated probabilities. T is fitted on the validation
split's probabilities (the run's harder split), by the negative log-likelihood.

Pure numpy/scipy (and pydantic for the record), so it is cheap to test.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

ECE_BINS = 10
_EPS = 1e-7


def scale_probabilities(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the probabilities of the same head with its logits divided by T.

    log(p) equals the logits up to a per-row constant, which softmax ignores."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0))
    logits /= temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    rows = np.arange(len(labels))
    return float(-np.mean(np.log(np.clip(probabilities[rows, labels], _EPS, 1.0))))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of softmax(log(p) / T) on these labels."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)

    def loss(log_t: float) -> float:
        return negative_log_likelihood(scale_probabilities(probabilities, np.exp(log_t)), labels)

    result = minimize_scalar(
        loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4}
    )
    return float(np.exp(result.x))


def reliability_curve(
    y_true: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS
) -> list[tuple[float, float, int]]:
    """(mean score, observed positive rate, count) for every non-empty equal-width bin."""
    y_true = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    which = np.minimum((scores * bins).astype(int), bins - 1)
    return [
        (
            float(scores[which == b].mean()),
            float(y_true[which == b].mean()),
            int((which == b).sum()),
        )
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(
    y_true: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Binary ECE of P(positive): |observed rate - mean score| per bin of the reliability
    curve, weighted by the bin's share of images."""
    curve = reliability_curve(y_true, scores, bins)
    total = sum(count for _, _, count in curve)
    return float(sum(count / total * abs(observed - mean) for mean, observed, count in curve))


class Calibration(BaseModel):
    """What run.json records under "calibration" (training.run_record.RunCalibration adds
    the threshold and the reliability curves); export folds `temperature` into the head."""

    model_config = ConfigDict(frozen=True)

    method: str
    temperature: float
    fitted_on: str
    n: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def calibrate(
    probabilities: np.ndarray,
    labels: np.ndarray,
    positive: np.ndarray,
    positive_scores,
    fitted_on: str,
) -> Calibration:
    """Fit T on (probabilities, label indices) and measure NLL and binary ECE before/after.

    `positive` is the per-image truth of the screening question, `positive_scores` the
    function that turns probabilities into P(positive) (service.scoring's)."""
    temperature = fit_temperature(probabilities, labels)
    scaled = scale_probabilities(probabilities, temperature)
    return Calibration(
        method="temperature scaling (NLL)",
        temperature=temperature,
        fitted_on=fitted_on,
        n=len(labels),
        nll_before=negative_log_likelihood(np.asarray(probabilities, np.float64), labels),
        nll_after=negative_log_likelihood(scaled, labels),
        ece_before=expected_calibration_error(positive, positive_scores(probabilities)),
        ece_after=expected_calibration_error(positive, positive_scores(scaled)),
    )
