"""training.ensemble: several runs as one model, through the export to a served bundle.

No training: two untrained runs of training/model.py (the second with its backbone and head
perturbed, so the members really differ) on the fixture X-rays.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.run_factory import FIXTURE_DATA, make_untrained_run

pytestmark = pytest.mark.slow

SIZE = 96


def _log_odds(probabilities: np.ndarray) -> np.ndarray:
    return np.log(probabilities[:, 1]) - np.log(probabilities[:, 0])


def _inputs() -> np.ndarray:
    from service.preprocessing import load_model_input

    paths = sorted((FIXTURE_DATA / "val").glob("*/*")) + sorted(
        (FIXTURE_DATA.parent / "fullres").iterdir()
    )
    return np.stack([load_model_input(p.read_bytes(), SIZE, SIZE) for p in paths])


def _perturbed_copy(run_dir: Path, out: Path) -> Path:
    """Another member: the same run with a changed last backbone layer and head."""
    from training.model import backbone_of, load_trained

    shutil.copytree(run_dir, out)
    model = load_trained(out / "model.keras")
    rng = np.random.default_rng(7)
    layer = next(lyr for lyr in reversed(backbone_of(model).layers) if lyr.weights)
    layer.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in layer.get_weights()]
    )
    dense = model.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel + rng.normal(0, 0.3, kernel.shape).astype(np.float32), bias + 0.2])
    model.save(out / "model.keras")
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ensemble")
    first = make_untrained_run(base / "m0", FIXTURE_DATA, SIZE, base / "cache")
    second = _perturbed_copy(first, base / "m1")
    return {"m0": first, "m1": second, "base": base, "cache": base / "cache"}


def test_ensemble_logits_are_the_mean_of_the_members_logits(members: dict[str, Path]) -> None:
    from training.ensemble import build_ensemble
    from training.model import load_trained

    models = [load_trained(members[m] / "model.keras") for m in ("m0", "m1")]
    images = _inputs()
    each = [_log_odds(m.predict(images, verbose=0)) for m in models]
    assert np.abs(each[0] - each[1]).max() > 0.1  # the members really differ
    ensemble = build_ensemble(models)
    np.testing.assert_allclose(
        _log_odds(ensemble.predict(images, verbose=0)), (each[0] + each[1]) / 2, atol=1e-4
    )


def test_members_must_share_the_validation_split(members: dict[str, Path]) -> None:
    from training.ensemble import ensemble_runs

    other = members["base"] / "other-split"
    shutil.copytree(members["m1"], other)
    split = json.loads((other / "split.json").read_text())
    split["validation"] = split["validation"][1:]
    (other / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="share the validation split"):
        ensemble_runs([members["m0"], other], members["base"] / "never", FIXTURE_DATA)


def test_members_must_preprocess_alike() -> None:
    import keras

    from training.ensemble import build_ensemble
    from training.model import build_model

    keras.utils.set_random_seed(1)
    plain = build_model("mobilenet", SIZE, 2, weights="none")
    stretched = build_model("mobilenet", SIZE, 2, weights="none", intensity_stretch=True)
    with pytest.raises(ValueError, match="preprocess differently"):
        build_ensemble([plain, stretched])


def test_ensemble_run_exports_to_a_bundle_the_service_serves(members: dict[str, Path]) -> None:
    from export.onnx_export import export_run
    from service.bundle import read_bundle
    from service.onnx_session import make_session
    from training.ensemble import ensemble_runs
    from training.model import load_trained

    run_dir, bundle = members["base"] / "ensemble", members["base"] / "bundle"
    ensemble_runs(
        [members["m0"], members["m1"]],
        run_dir,
        FIXTURE_DATA,
        cache_dir=members["cache"],
        batch_size=8,
    )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["ensemble"]["members"] == [str(members["m0"]), str(members["m1"])]
    assert "calibration" in run  # evaluate_run fitted its temperature
    assert (run_dir / "report" / "metrics.json").is_file()

    export_run(
        run_dir,
        bundle,
        FIXTURE_DATA,
        version="0.0.1-test",
        cache_dir=members["cache"],
        gate_rotation_images=64,
    )
    meta = read_bundle(bundle)
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "An ensemble of 2 runs in one graph" in card and "(all members together)" in card
    assert meta.gate is not None and meta.gate.feature_dim == 2 * 1024  # both members' features
    session = make_session(bundle / "model.onnx")
    images = _inputs()
    probabilities, features, cam = session.run(
        ["probabilities", "features", "cam"], {"image": images}
    )
    assert features.shape == (len(images), 2048)
    # The exact CAM survives: its mean is the ensemble's (calibrated) log-odds.
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), _log_odds(probabilities), atol=1e-3)
    # Calibration folded in: the ONNX log-odds are the Keras ensemble's divided by T.
    keras_odds = _log_odds(load_trained(run_dir / "model.keras").predict(images, verbose=0))
    np.testing.assert_allclose(
        _log_odds(probabilities) * run["calibration"]["temperature"], keras_odds, atol=1e-3
    )
