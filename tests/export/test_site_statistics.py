"""The statistics behind `pneumoscreen calibrate`: the sample-size rule, the rank AUC and
the patient-level bootstrap, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.sample_size import Z, assess, kept_positives, positives_needed, wilson_interval
from service.patient_bootstrap import auc, bootstrap_figures
from service.scoring import choose_threshold


def _wilson_by_bisection(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval from its definition: the p with |k/n - p| <= z sqrt(p(1-p)/n)."""
    observed = k / n

    def outside(p: float) -> bool:
        return abs(observed - p) > z * math.sqrt(p * (1 - p) / n)

    def edge(inside: float, beyond: float) -> float:
        for _ in range(200):
            middle = (inside + beyond) / 2
            if outside(middle):
                beyond = middle
            else:
                inside = middle
        return inside

    return edge(observed, 0.0), edge(observed, 1.0)


@pytest.mark.parametrize(("k", "n"), [(19, 20), (121, 127), (50, 100), (0, 10), (10, 10)])
def test_wilson_interval_matches_its_definition(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _wilson_by_bisection(k, n, Z)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)


def test_kept_positives_is_what_choose_threshold_keeps() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 7, 20, 127, 333):
        for target in (0.8, 0.9, 0.95, 0.99):
            scores = np.r_[rng.random(n), rng.random(5)]
            y = np.r_[np.ones(n), np.zeros(5)]
            threshold = choose_threshold(y, scores, target)
            assert int((scores[:n] >= threshold).sum()) == kept_positives(target, n)


@pytest.mark.parametrize(("target", "margin"), [(0.95, 0.05), (0.9, 0.25), (0.9, 0.1)])
def test_positives_needed_is_where_the_lower_bound_holds_from_then_on(
    target: float, margin: float
) -> None:
    needed = positives_needed(target, margin)
    assert needed is not None

    def holds(n: int) -> bool:
        low, _ = _wilson_by_bisection(kept_positives(target, n), n, Z)
        return low >= target - margin - 1e-9

    assert not holds(needed - 1)
    assert all(holds(n) for n in range(needed, needed + 400))


def test_the_default_rule_needs_127_positive_patients() -> None:
    # The figure the help text and docs/site-calibration.md quote.
    assert positives_needed(0.95, 0.05) == 127
    assert not assess(0.95, 0.05, 126, 500).enough
    assert assess(0.95, 0.05, 127, 127).enough
    assert not assess(0.95, 0.05, 127, 126).enough
    assert assess(0.95, 0.05, 127, 40, min_negatives=40).enough


def test_a_margin_no_site_can_meet_is_said_so() -> None:
    sufficiency = assess(0.95, 1e-4, 10_000, 10_000)
    assert sufficiency.positives_needed is None and not sufficiency.enough
    assert "larger --margin" in sufficiency.shortfall("PNEUMONIA", "NORMAL")


def test_shortfall_names_the_counts_needed() -> None:
    message = assess(0.95, 0.05, 15, 200).shortfall("PNEUMONIA", "NORMAL")
    assert "15 PNEUMONIA patients, at least 127 are needed" in message
    assert "NORMAL" not in message
    assert assess(0.95, 0.05, 300, 300).shortfall("PNEUMONIA", "NORMAL") is None


def test_auc_matches_scikit_learn_with_ties_and_weights() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.4
    scores = np.round(rng.random(300) + 0.3 * y, 2)  # rounded: many ties
    assert auc(y, scores) == pytest.approx(metrics.roc_auc_score(y, scores), abs=1e-12)
    # Integer weights are the same as repeating images.
    weights = rng.integers(0, 4, size=300)
    repeated = np.repeat(np.arange(300), weights)
    assert auc(y, scores, weights) == pytest.approx(
        metrics.roc_auc_score(y[repeated], scores[repeated]), abs=1e-12
    )


def test_bootstrap_intervals_contain_the_point_estimates_and_are_seeded() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(60, bool), np.zeros(80, bool)]
    scores = rng.random(140) + 0.5 * y
    patients = [f"p{i // 2}" for i in range(140)]  # two images per patient
    figures = bootstrap_figures(y, scores, patients, threshold=0.6, replicates=500, seed=5)
    assert figures["sensitivity"].value == pytest.approx(float((scores[y] >= 0.6).mean()))
    assert figures["specificity"].value == pytest.approx(float((scores[~y] < 0.6).mean()))
    for estimate in figures.values():
        assert 0.0 <= estimate.low <= estimate.value <= estimate.high <= 1.0
        assert estimate.low < estimate.high
    again = bootstrap_figures(y, scores, patients, threshold=0.6, replicates=500, seed=5)
    assert again == figures


def test_bootstrap_draws_patients_not_images() -> None:
    # One positive patient with 50 detected films, five with one missed film each: the
    # image-level sensitivity is 50/55, but a sample of six patients without the first
    # one (a third of the draws) detects nothing, so the patient-level interval reaches 0.
    y = np.r_[np.ones(55, bool), np.zeros(20, bool)]
    scores = np.r_[np.full(50, 0.9), np.full(5, 0.1), np.full(20, 0.2)]
    patients = ["A"] * 50 + [f"B{i}" for i in range(5)] + [f"N{i}" for i in range(20)]
    figures = bootstrap_figures(y, scores, patients, threshold=0.5, replicates=1000, seed=0)
    assert figures["sensitivity"].value == pytest.approx(50 / 55)
    assert figures["sensitivity"].low == 0.0
    # Counted per image, the same films give a tight interval around 50/55.
    per_image = bootstrap_figures(
        y, scores, [str(i) for i in range(75)], threshold=0.5, replicates=1000, seed=0
    )
    assert per_image["sensitivity"].low > 0.8
