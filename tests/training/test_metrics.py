"""The threshold rule and the screening metrics, on scores with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.bundle import VALIDATION_METRIC_NAMES
from training.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    scale_probabilities,
)
from training.metrics import (
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
    plot_confusion,
    plot_reliability,
    plot_roc,
)


def test_threshold_is_the_highest_reaching_the_target_sensitivity() -> None:
    # 20 positives scored 0.05, 0.10, ..., 1.00: keeping 19 of them (95%) needs t = 0.10.
    positives = np.arange(1, 21) / 20
    negatives = np.array([0.02, 0.04, 0.08, 0.3, 0.6])
    y = np.r_[np.ones(20), np.zeros(5)]
    scores = np.r_[positives, negatives]
    threshold = choose_threshold(y, scores, 0.95)
    assert threshold == pytest.approx(0.10)
    metrics = binary_metrics(y, scores, threshold)
    assert metrics["sensitivity"] == pytest.approx(0.95)
    assert metrics["confusion_matrix"] == {"tn": 3, "fp": 2, "fn": 1, "tp": 19}
    # A slightly higher threshold would miss a second positive.
    assert binary_metrics(y, scores, threshold + 1e-6)["sensitivity"] < 0.95


def test_threshold_for_full_sensitivity_is_the_lowest_positive_score() -> None:
    y = np.array([1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.4, 0.7, 0.5, 0.1])
    assert choose_threshold(y, scores, 1.0) == pytest.approx(0.4)


def test_threshold_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        choose_threshold(np.ones(4), np.linspace(0, 1, 4), 0.95)


def test_binary_metrics_on_a_known_confusion_matrix() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1, 0.1, 0.0])
    m = binary_metrics(y, scores, 0.5)
    assert m["confusion_matrix"] == {"tn": 5, "fp": 1, "fn": 1, "tp": 3}
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.8)
    # 24 positive-negative pairs; 0.2 vs 0.2 ties count half; 0.2 < 0.6 and 0.3 lose.
    assert m["auc"] == pytest.approx((24 - 2 - 0.5) / 24)
    # Every name export copies into a bundle's validation_metrics is there.
    assert set(VALIDATION_METRIC_NAMES) <= set(m)


def test_report_figures_are_written(tmp_path: Path) -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.6, 0.4, 0.1, 0.3, 0.5])
    m = binary_metrics(y, scores, 0.45)
    plot_roc({"validation": (y, scores)}, tmp_path / "roc.png", {"validation": m})
    plot_confusion(m, tmp_path / "cm.png", "validation")
    for name in ("roc.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_more_patients() -> None:
    rng = np.random.default_rng(1)

    def widths(n: int) -> tuple[dict, dict]:
        y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]
        point = binary_metrics(y, scores, 0.5)
        return point, bootstrap_intervals(
            y, scores, 0.5, [f"p{i}" for i in range(2 * n)], resamples=400
        )

    _, small = widths(40)
    large_point, large = widths(400)
    for name in ("auc", "sensitivity", "specificity"):
        low, high = large[name]
        assert low <= large_point[name] <= high
        assert high - low < small[name][1] - small[name][0]


def test_bootstrap_intervals_are_none_without_both_classes() -> None:
    y = np.ones(50, bool)
    intervals = bootstrap_intervals(y, np.full(50, 0.9), 0.5, ["one"] * 50, resamples=50)
    assert intervals == {"auc": None, "sensitivity": None, "specificity": None}


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    # Labels drawn from softmax(z); the model reports softmax(3 z): overconfident by T = 3.
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 1.5, (4000, 1)) * np.array([[-0.5, 0.5]])
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = (rng.random(4000) < true[:, 1]).astype(int)
    reported = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    assert fit_temperature(reported, labels) == pytest.approx(3.0, rel=0.1)
    fit = calibrate(reported, labels, labels.astype(bool), lambda p: p[:, 1], "synthetic")
    assert fit.ece_after < fit.ece_before and fit.nll_after < fit.nll_before


def test_scaling_keeps_the_ranking_and_maps_one_to_one() -> None:
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.02, 0.98]])
    scaled = scale_probabilities(p, 2.0)
    assert np.allclose(scaled.sum(1), 1.0)
    assert np.argsort(scaled[:, 1]).tolist() == np.argsort(p[:, 1]).tolist()
    assert np.allclose(scale_probabilities(p, 1.0), p)
    assert scaled[2, 1] < p[2, 1]  # T > 1 softens


def test_ece_is_zero_when_scores_match_the_observed_rate() -> None:
    y = np.r_[np.ones(3), np.zeros(7), np.ones(8), np.zeros(2)]
    scores = np.r_[np.full(10, 0.3), np.full(10, 0.8)]
    assert expected_calibration_error(y, scores) == pytest.approx(0.0)
    assert expected_calibration_error(y, 1 - scores) > 0.3


def test_reliability_diagram_is_written(tmp_path: Path) -> None:
    path = tmp_path / "reliability.png"
    plot_reliability({"a": [(0.1, 0.2, 5), (0.8, 0.7, 9)]}, path)
    assert path.stat().st_size > 1000
