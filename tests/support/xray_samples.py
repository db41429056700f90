"""Real X-ray bytes for the service tests, and a direct onnxruntime reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FULLRES = sorted((FIXTURES / "fullres").glob("*.jpeg"))
SMALL = sorted((FIXTURES / "chest_xray" / "val").glob("*/*.jpeg"))


def png_bytes(path: Path, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    image = Image.open(path).convert("L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    elif mode != "L":
        image = image.convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_probabilities(bundle_dir: Path, data: bytes) -> dict[str, float]:
    """What the model says about `data` when run directly on the shared preprocessing."""
    from service.bundle import read_bundle
    from service.onnx_session import make_session
    from service.preprocessing import load_model_input

    meta = read_bundle(bundle_dir)
    session = make_session(bundle_dir / "model.onnx")
    image = load_model_input(data, meta.input.height, meta.input.width)
    (output,) = session.run(["probabilities"], {"image": image[None]})
    row = np.asarray(output[0], dtype=np.float64)
    row = row / row.sum()
    return dict(zip(meta.labels, row.tolist(), strict=True))
