"""The gate's fit (export/gate_fit.py) and its serving renditions, without TensorFlow:
the threshold's confidence bound, the renditions, and a fit on the fixture X-rays."""

from __future__ import annotations

import numpy as np
import pytest

from export.gate_fit import ROUNDING_MARGIN, fit_gate, quantile_upper_bound
from export.serving_renditions import serving_renditions
from service.gate import decide
from tests.support.bundle_factory import fixture_inputs


def test_the_bound_covers_the_quantile_as_often_as_it_says() -> None:
    rng = np.random.default_rng(7)
    share, confidence, n, trials = 0.995, 0.95, 2000, 400
    true_quantile = 2.5758293035489  # standard normal, 99.5%
    results = [
        quantile_upper_bound(rng.standard_normal(n), share, confidence) for _ in range(trials)
    ]
    covered = np.mean([bound >= true_quantile for bound, _ in results])
    # 400 trials: a 95% coverage shows as 0.95 +- 0.011 (sd); a plain quantile gives ~0.5.
    assert 0.92 <= covered <= 0.99
    assert all(achieved >= confidence for _, achieved in results)


def test_too_few_values_for_the_confidence_give_the_largest() -> None:
    values = np.arange(1.0, 101.0)
    bound, achieved = quantile_upper_bound(values, 0.995, 0.95)
    assert bound == pytest.approx(100.0 * (1 + ROUNDING_MARGIN))
    assert achieved == pytest.approx(1 - 0.995**100)


def test_the_bound_is_an_order_statistic_above_the_plain_quantile() -> None:
    values = np.random.default_rng(3).exponential(size=5000)
    bound, achieved = quantile_upper_bound(values, 0.99, 0.95)
    plain = float(np.quantile(values, 0.99, method="higher"))
    assert bound > plain * (1 + ROUNDING_MARGIN)
    assert bound / (1 + ROUNDING_MARGIN) in values
    assert 0.95 <= achieved < 0.99


def test_serving_renditions_stay_the_same_radiograph() -> None:
    images, _ = fixture_inputs(224, "val")
    rendered = serving_renditions(images)
    assert rendered.shape == images.shape and rendered.dtype == np.uint8
    assert np.array_equal(rendered, serving_renditions(images))  # seeded
    assert np.array_equal(rendered[..., 0], rendered[..., 2])  # grey, as the service makes
    for original, rendition in zip(images, rendered, strict=True):
        a, b = original[..., 0].astype(float).ravel(), rendition[..., 0].astype(float).ravel()
        assert not np.array_equal(a, b)
        assert np.corrcoef(a, b)[0, 1] > 0.9  # another exposure and detail, same picture


def _block_features(images: np.ndarray) -> np.ndarray:
    """A stand-in for the model: 8 x 8 block means of the grey image (64 features)."""
    grey = images[..., 0].astype(np.float64)
    n, h, w = grey.shape
    return grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def test_the_fit_holds_renditions_and_passes_every_validation_rendition() -> None:
    train, labels = fixture_inputs(64, "train")
    val, _ = fixture_inputs(64, "val")
    stats, info = fit_gate(
        _block_features, train, labels, ["NORMAL", "PNEUMONIA"], val, components=8
    )
    plain_stats, plain = fit_gate(
        _block_features, train, labels, ["NORMAL", "PNEUMONIA"], val, components=8, render=None
    )
    counts = info.fitted_on["per_class"]
    assert counts["NORMAL"] == 2 * int(np.sum(labels == 0))
    assert counts["PNEUMONIA"] == 2 * int(np.sum(labels == 1))
    assert plain.fitted_on["per_class"]["NORMAL"] == int(np.sum(labels == 0))
    assert plain.fitted_on["serving_renditions"] == "none"
    # A handful of validation images is too few for 95% on the 99.5% quantile: the
    # threshold is the largest distance, over both renditions of each image.
    assert info.fitted_on["threshold_confidence"] == pytest.approx(1 - 0.995 ** len(val))
    rendered = _block_features(serving_renditions(val))
    for features in (_block_features(val), rendered):
        assert all(decide(stats, info, row).accepted for row in stats.distances(features))
    assert info.acceptance["validation_renditions"] == {
        "n": len(val),
        "accepted": len(val),
        "rate": 1.0,
    }
    assert "validation_renditions" not in plain.acceptance
    assert plain.threshold > 0 and plain_stats.means.shape == stats.means.shape


def test_the_fit_refuses_a_confidence_outside_its_range() -> None:
    train, labels = fixture_inputs(64, "train")
    with pytest.raises(ValueError, match="confidence"):
        fit_gate(_block_features, train, labels, ["NORMAL", "PNEUMONIA"], train, confidence=1.0)
