"""training.evaluate: the probabilities a caller already has for a split stand in for
predicting it again, only for the same images in the same order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.run_factory import FIXTURE_DATA, make_untrained_run
from training.data import list_split
from training.evaluate import KnownProbabilities, evaluate_predictions
from training.run_record import read_run


def test_known_probabilities_replace_predicting_the_same_images(tmp_path: Path) -> None:
    record = read_run(make_untrained_run(tmp_path / "run", FIXTURE_DATA, 32, None))
    everything = list_split(FIXTURE_DATA, "train")
    samples = [s for s in everything if s.label == "NORMAL"][:3] + [
        s for s in everything if s.label == "PNEUMONIA"
    ][:3]
    predicted: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        predicted.append(len(x))
        return np.tile([0.4, 0.6], (len(x), 1))

    given = np.array([[0.9, 0.1]] * 3 + [[0.2, 0.8]] * 3)
    known = {"validation": KnownProbabilities([s.path for s in samples], given)}

    results = evaluate_predictions(
        {"validation": samples, "test": samples[1:5]}, predict, record, None, known
    )
    assert predicted == [4], "only the split without known probabilities is predicted"
    assert np.array_equal(results["validation"].probabilities, given)
    assert results["validation"].metrics["auc"] == 1.0  # from `given`, not from predict

    # The same images in another order, or other images: predicted as before.
    predicted.clear()
    again = evaluate_predictions({"validation": samples[::-1]}, predict, record, None, known)
    assert predicted == [6]
    assert np.array_equal(again["validation"].probabilities, np.tile([0.4, 0.6], (6, 1)))
