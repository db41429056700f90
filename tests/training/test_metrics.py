"""The threshold rule and the screening metrics, on scores with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.metrics import binary_metrics, choose_threshold, plot_confusion, plot_roc


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


def test_report_figures_are_written(tmp_path: Path) -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.6, 0.4, 0.1, 0.3, 0.5])
    m = binary_metrics(y, scores, 0.45)
    plot_roc({"validation": (y, scores)}, tmp_path / "roc.png", {"validation": m})
    plot_confusion(m, tmp_path / "cm.png", "validation")
    for name in ("roc.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
