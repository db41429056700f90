"""The format 2 export on a real Keras MobileNet: extra outputs, exact CAM, the gate.

No training: the classifier of training/model.py is built (ImageNet weights from
../shared/weights when present, else random), saved as a run folder with a real split
and report (training's own code), and exported with `export_run`. What is checked:

- all three ONNX outputs agree with Keras (the export's own parity check, and here again);
- the CAM recomputed in numpy from the Keras feature maps and the Dense weights equals
  the ONNX `cam`; the pooled features are the feature maps' mean; mean(cam) is the
  log-odds of the two-label softmax;
- the bundle is format 2, read_bundle verifies gate.npz's sha256, and the service's gate
  loaded from it accepts the validation X-rays it was set on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.bundle import GATE_FILE, BundleError, read_bundle
from tests.support.run_factory import (
    FIXTURE_DATA,
    SHARED_MOBILENET_WEIGHTS,
    make_untrained_run,
    mobilenet_weights,
)

pytestmark = pytest.mark.slow

DATA = FIXTURE_DATA
FIXTURES = DATA.parent
SIZE = 96


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from export.onnx_export import export_run

    base = tmp_path_factory.mktemp("explain")
    run_dir, bundle = base / "run", base / "bundle"
    weights = mobilenet_weights()
    make_untrained_run(run_dir, DATA, SIZE, base / "cache", weights)
    export_run(
        run_dir,
        bundle,
        DATA,
        version="0.0.1-test",
        cache_dir=base / "cache",
        gate_rotation_images=64,
    )
    return {"run": run_dir, "bundle": bundle, "cache": base / "cache"}


def _fixture_inputs() -> np.ndarray:
    from service.preprocessing import load_model_input

    paths = sorted((FIXTURES / "fullres").iterdir()) + sorted((DATA / "val").glob("*/*"))
    return np.stack([load_model_input(p.read_bytes(), SIZE, SIZE) for p in paths])


def test_cam_in_numpy_equals_the_onnx_output(exported: dict[str, Path]) -> None:
    from export.explain_graph import cam_direction, feature_maps
    from service.onnx_session import make_session
    from training.model import load_trained
    from training.run_record import read_run

    model = load_trained(exported["run"] / "model.keras")
    images = _fixture_inputs()
    session = make_session(exported["bundle"] / "model.onnx")
    probabilities, features, cam = session.run(
        ["probabilities", "features", "cam"], {"image": images}
    )
    maps = feature_maps(model, images).astype(np.float64)
    kernel, bias = model.get_layer("probabilities").get_weights()
    # Export folds the run's fitted temperature into the head (export.onnx_export), so the
    # served CAM is the calibrated head's: kernel and bias divided by T.
    calibration = read_run(exported["run"]).calibration
    assert calibration is not None
    temperature = calibration.temperature
    kernel, bias = kernel / temperature, bias / temperature
    weights, offset = cam_direction(kernel, bias, [1])
    np.testing.assert_allclose(weights, kernel[:, 1] - kernel[:, 0], rtol=1e-6)
    numpy_cam = maps @ weights.astype(np.float64) + offset
    scale = max(1.0, float(np.abs(numpy_cam).max()))
    assert cam.shape == numpy_cam.shape == (len(images), 3, 3)
    assert np.max(np.abs(cam - numpy_cam)) / scale < 1e-4
    np.testing.assert_allclose(features, maps.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    # The exact decomposition: the CAM's mean is the log-odds of the 2-label softmax.
    log_odds = np.log(probabilities[:, 1].astype(np.float64)) - np.log(probabilities[:, 0])
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), log_odds, atol=1e-3)
    if SHARED_MOBILENET_WEIGHTS.is_file():
        assert np.ptp(cam) > 1e-3, "real features: the maps differ between images"


def test_bundle_is_format_2_with_a_verified_gate(exported: dict[str, Path]) -> None:
    from service.gate import InputGate

    meta = read_bundle(exported["bundle"])
    assert meta.format_version == 2 and meta.has_explain_outputs
    assert set(meta.files_sha256) == {"model.onnx", GATE_FILE}
    parity = meta.validation_metrics["parity_by_output"]
    assert set(parity) == {"probabilities", "features", "cam"}
    assert all(value < 1e-4 for value in parity.values())
    assert meta.gate is not None and meta.gate.feature_dim == 1024
    assert meta.gate.acceptance["validation"]["n"] == meta.validation_metrics["n"]
    card = (exported["bundle"] / "MODEL_CARD.md").read_text()
    assert "## Input gate" in card

    gate = InputGate.load(exported["bundle"], meta, enabled=True)
    assert gate is not None and gate.stats.means.shape == (5, meta.gate.components)
    assert gate.stats.basis.shape == (1024, meta.gate.components)

    # gate.npz is covered by the bundle's sha256 check.
    with (exported["bundle"] / GATE_FILE).open("ab") as handle:
        handle.write(b"\0")
    try:
        with pytest.raises(BundleError, match="sha256"):
            read_bundle(exported["bundle"])
    finally:
        data = (exported["bundle"] / GATE_FILE).read_bytes()[:-1]
        (exported["bundle"] / GATE_FILE).write_bytes(data)
    read_bundle(exported["bundle"])


def test_int8_bundle_gets_its_own_gate(exported: dict[str, Path], tmp_path: Path) -> None:
    from export.quantize import quantize_bundle

    fp32 = read_bundle(exported["bundle"])
    int8 = quantize_bundle(
        exported["bundle"], tmp_path / "int8", exported["run"], DATA, cache_dir=exported["cache"]
    )
    assert read_bundle(tmp_path / "int8") == int8
    assert int8.format_version == 2 and int8.gate is not None and fp32.gate is not None
    assert set(int8.files_sha256) == {"model.onnx", GATE_FILE}
    # Refitted on the INT8 model's own features, not copied from the FP32 bundle.
    assert int8.files_sha256[GATE_FILE] != fp32.files_sha256[GATE_FILE]
