"""Serving renditions: a published 224 px training X-ray made to reach the model the way a
hospital's full-resolution upload does, so the input gate is fitted on what serving sees.

Why: the data set's images were downsized and JPEG-encoded at 224 px by its authors; a
full-resolution radiograph goes through our own decode instead (JPEG draft mode, then a
bilinear stretch: service/preprocessing.py). Measured on the shipped 2.0.0 model, the 120
full-resolution originals decoded by the service sit on average 0.97 Mahalanobis units
further from the training classes than their own 224 px copies (their pixels differ by
about 2 grey levels on average and carry about 9% more fine detail: no 224 px JPEG
smoothing). A gate fitted and thresholded on the 224 px copies alone therefore refuses
more full-size uploads than its validation figure says.

A rendition (parameters drawn per image, fixed before any gate was measured on it):

- exposure: gamma, log-uniform in [0.8, 1.25] (another exposure curve; the classifier's
  strong augmentation trained on the wider [0.6, 1.6]);
- size: Lanczos upscale to a hospital-like size, width 448-1600 px, height 0.7-1.0 of the
  width (the originals are 400-2900 px wide and mostly landscape);
- detail: half of them an unsharp mask (edge enhancement, radius 0.5-1.5 px and amount
  20-100% at 224 px scale), the other half a Gaussian blur (sigma up to 0.7 px at 224 px);
- a JPEG at quality 75-95, then the service's own decode and resize
  (service.preprocessing.load_model_input).

What it cannot reproduce is the hospital's original pixels (the detail lost at 224 px is
gone); it covers the processing differences, which are what moves the features.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

from service.preprocessing import load_model_input

GAMMA_RANGE = (0.8, 1.25)
WIDTH_RANGE = (448, 1600)
ASPECT_RANGE = (0.7, 1.0)  # height / width
UNSHARP_RADIUS = (0.5, 1.5)  # px at model-input scale
UNSHARP_PERCENT = (20, 100)
BLUR_SIGMA = (0.0, 0.7)  # px at model-input scale
JPEG_QUALITY = (75, 95)
SEED = 20261201


def serving_rendition(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One model input (H, W, 3) uint8 (grey repeated) -> its rendition, same shape."""
    height, width = image.shape[:2]
    grey = image[..., 0]
    gamma = math.exp(rng.uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1])))
    curve = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    big_width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    big_height = max(height, round(big_width * rng.uniform(*ASPECT_RANGE)))
    big = Image.fromarray(curve[grey]).resize((big_width, big_height), Image.Resampling.LANCZOS)
    scale = big_width / width
    if rng.random() < 0.5:
        big = big.filter(
            ImageFilter.UnsharpMask(
                radius=scale * rng.uniform(*UNSHARP_RADIUS),
                percent=int(rng.integers(UNSHARP_PERCENT[0], UNSHARP_PERCENT[1] + 1)),
                threshold=0,
            )
        )
    else:
        big = big.filter(ImageFilter.GaussianBlur(radius=scale * rng.uniform(*BLUR_SIGMA)))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    return load_model_input(buffer.getvalue(), height, width)


def serving_renditions(images: np.ndarray, seed: int = SEED) -> np.ndarray:
    """One rendition of each model input (N, H, W, 3); the same seed gives the same ones."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = serving_rendition(image, rng)
    return out
