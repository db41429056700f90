"""training.model: the in-graph intensity stretch, through Keras save/load and ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE = 64


def _radiograph_like(seed: int) -> np.ndarray:
    """A smooth grey image with a dark border, repeated into 3 channels like the service's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    grey = 60 + 120 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 6)
    grey += rng.normal(0, 3, (SIZE, SIZE))
    grey[:4] = 5
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def test_stretch_removes_a_linear_change_of_exposure() -> None:
    from training.model import PercentileStretch

    image = _radiograph_like(0).astype(np.float32)
    darker = np.clip(image * 0.6 + 20, 0, 255).round()  # another machine's window
    out = np.asarray(PercentileStretch()(np.stack([image, darker]).astype(np.uint8)))
    assert out.min() >= 0 and out.max() <= 255
    assert out[0].max() == pytest.approx(255.0) and out[0].min() == pytest.approx(0.0)
    # Rounding to uint8 before the stretch leaves about one grey level of difference.
    assert np.abs(out[0] - out[1]).mean() < 2.0
    assert np.abs(image - darker).mean() > 20  # what the model would have seen without it


def test_flat_image_stays_finite() -> None:
    from training.model import PercentileStretch

    flat = np.full((1, SIZE, SIZE, 3), 128, dtype=np.uint8)
    out = np.asarray(PercentileStretch()(flat))
    assert np.isfinite(out).all()


@pytest.mark.slow
def test_stretched_model_saves_loads_and_exports_with_parity(tmp_path: Path) -> None:
    import keras

    from export.onnx_export import convert_to_onnx, onnx_predict
    from training.model import build_model, load_trained

    keras.utils.set_random_seed(5)
    model = build_model("mobilenet", SIZE, 2, weights="none", intensity_stretch=True)
    assert model.get_layer("intensity_stretch") is not None
    model.save(tmp_path / "model.keras")
    reloaded = load_trained(tmp_path / "model.keras")
    images = np.stack([_radiograph_like(i) for i in range(4)])
    expected = reloaded.predict(images, verbose=0)
    np.testing.assert_allclose(expected, model.predict(images, verbose=0), atol=1e-6)

    convert_to_onnx(reloaded, SIZE, tmp_path / "model.onnx")
    np.testing.assert_allclose(onnx_predict(tmp_path / "model.onnx", images), expected, atol=1e-4)
