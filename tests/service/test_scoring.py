"""service.inference.score and service.scoring: labels, threshold, P(positive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.inference import score
from service.scoring import normalise, positive_probability
from tests.support.bundle_factory import make_tiny_bundle


def test_score_two_labels_follows_threshold(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path, threshold=0.41)
    at = score(meta, np.array([0.59, 0.41], dtype=np.float32))
    assert at.screen_positive and at.label == "PNEUMONIA"
    below = score(meta, np.array([0.6, 0.4], dtype=np.float32))
    assert not below.screen_positive and below.label == "NORMAL"
    # float32 outputs that do not quite sum to 1 are renormalised.
    odd = score(meta, np.array([0.3000001, 0.7000002], dtype=np.float32))
    assert sum(odd.probabilities.values()) == pytest.approx(1.0, abs=1e-12)
    assert odd.positive_probability == odd.probabilities["PNEUMONIA"]


def test_score_three_labels(tmp_path: Path) -> None:
    meta = make_tiny_bundle(tmp_path, labels=("NORMAL", "BACTERIAL", "VIRAL"), threshold=0.5)
    # NORMAL is the argmax, but BACTERIAL + VIRAL = 0.55 >= 0.5: positive, most likely VIRAL.
    positive = score(meta, np.array([0.45, 0.25, 0.30]))
    assert positive.screen_positive and positive.label == "VIRAL"
    assert positive.positive_probability == pytest.approx(0.55)
    negative = score(meta, np.array([0.6, 0.3, 0.1]))
    assert not negative.screen_positive and negative.label == "NORMAL"


@pytest.mark.parametrize("labels", [("NORMAL", "PNEUMONIA"), ("NORMAL", "BACTERIAL", "VIRAL")])
def test_score_uses_the_training_definition_of_p_positive(
    tmp_path: Path, labels: tuple[str, ...]
) -> None:
    """The service decides with exactly the value the threshold was chosen on."""
    meta = make_tiny_bundle(tmp_path, labels=labels, threshold=0.5)
    rows = np.random.default_rng(7).dirichlet(np.ones(len(labels)), 200).astype(np.float32)
    rows[::3] *= np.float32(1.0000003)  # float32 rows that do not quite sum to 1
    expected = positive_probability(rows, meta.positive_indices())
    probabilities = normalise(rows)
    for row, p_positive, row_probabilities in zip(rows, expected, probabilities, strict=True):
        scored = score(meta, row)
        assert scored.positive_probability == float(p_positive)
        assert list(scored.probabilities.values()) == [float(p) for p in row_probabilities]
        assert scored.screen_positive == (float(p_positive) >= meta.threshold)
    with pytest.raises(ValueError, match="no usable probabilities"):
        score(meta, np.zeros(len(labels), dtype=np.float32))
