"""Fit the input gate at export, from the model's own features of the run's X-rays.

Classes: one per label (the training X-rays of that label, each as published and as a
serving rendition, see below) and ROTATED_90, ROTATED_180, ROTATED_270 (training X-rays
turned counter-clockwise, evenly thinned to `rotation_images`). The features are first
projected on their top `components` principal components (PCA of all those training
features, upright and rotated): measured on an ImageNet MobileNet, the full 1024
dimensions also separate the data set's 224 px JPEG copies from the same radiographs
decoded at full resolution (small, many-dimensional nuisance differences), while the top
64 components keep X-ray against non-X-ray and upright against rotated. Each class is a
Gaussian with its own mean; all share one covariance, estimated with Ledoit-Wolf
shrinkage from the within-class deviations. The service scores the Mahalanobis distance
to each mean (service/gate.py).

Serving renditions (export/serving_renditions.py): the published images were downsized
and JPEG-encoded by the data set's authors, while a full-resolution upload goes through
our own decode and resize, with other exposure curves and edge processing; fitted on the
published copies alone, the gate put full-size uploads further out than its validation
images. So every upright class also holds one rendition of each training X-ray (another
gamma, upscaled, sharpened or blurred, JPEG-encoded, then decoded and resized by the
service's own code), and every validation X-ray counts with its worse distance of the
two (published, rendition).

Thresholds: a one-sided `confidence` (95%) upper confidence bound of the
`target_acceptance` quantile of those validation distances to the nearest upright class,
distribution-free (an order statistic, binomial), so that the estimate from a few hundred
images errs towards accepting; when there are too few images for that confidence, the
largest distance, and the confidence it does give is recorded. The same rule on the
rotated validation X-rays' distance to their nearest rotated class. What the gate then
does on the validation split (accepted upright and as renditions, refused rotated) is
measured with the service's own decision function and recorded in model.json.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from export.serving_renditions import serving_renditions
from service.bundle import GateInfo
from service.gate import ROTATED_IMAGE, ROTATED_PREFIX, GateStats, decide

METHOD = (
    "mahalanobis in the top principal components, class means, shared Ledoit-Wolf "
    "covariance, rotated classes"
)
TARGET_ACCEPTANCE = 0.995
COMPONENTS = 64
ROTATION_IMAGES = 1024
QUARTER_TURNS = (1, 2, 3)
CONFIDENCE = 0.95
RENDER_CHUNK = 512

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float (N, D)
RenderFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> the same, rendered


def rotate(images: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Model inputs (N, H, W, 3) turned counter-clockwise by quarter_turns x 90 degrees."""
    return np.ascontiguousarray(np.rot90(images, quarter_turns, axes=(1, 2)))


def rotated_class(quarter_turns: int) -> str:
    return f"{ROTATED_PREFIX}{90 * quarter_turns}"


def thin(images: np.ndarray, limit: int) -> np.ndarray:
    return images[:: max(1, len(images) // limit)][:limit] if len(images) > limit else images


def principal_subspace(features: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Center (D,) and the top `components` principal directions (D, k) of features."""
    center = features.mean(axis=0)
    k = max(1, min(components, features.shape[1], len(features) - 1))
    _, _, directions = np.linalg.svd(features - center, full_matrices=False)
    return center, np.ascontiguousarray(directions[:k].T)


def fit_stats(
    features_by_class: dict[str, np.ndarray], components: int = COMPONENTS
) -> tuple[GateStats, float]:
    """Principal subspace, class means and the shared shrunk precision matrix in it;
    returns the Ledoit-Wolf shrinkage too."""
    from sklearn.covariance import LedoitWolf

    classes = [name for name, values in features_by_class.items() if len(values)]
    raw = {c: np.asarray(features_by_class[c], np.float64) for c in classes}
    center, basis = principal_subspace(np.concatenate(list(raw.values())), components)
    projected = {c: (values - center) @ basis for c, values in raw.items()}
    means = np.stack([projected[c].mean(axis=0) for c in classes])
    deviations = np.concatenate(
        [projected[c] - mean for c, mean in zip(classes, means, strict=True)]
    )
    estimate = LedoitWolf(assume_centered=True).fit(deviations)
    precision = np.asarray(estimate.precision_, dtype=np.float64)
    precision = (precision + precision.T) / 2
    return GateStats(tuple(classes), center, basis, means, precision), float(estimate.shrinkage_)


def _upright_distance(stats: GateStats, distances: np.ndarray) -> np.ndarray:
    return distances[:, stats.upright].min(axis=1)


def _rotated_distance(stats: GateStats, distances: np.ndarray) -> np.ndarray:
    return distances[:, ~stats.upright].min(axis=1)


# The bound is one validation image's own distance; onnxruntime gives that image
# features a few 1e-7 different at another batch size, so it could land a hair outside.
ROUNDING_MARGIN = 1e-4


def quantile_upper_bound(
    values: np.ndarray, share: float, confidence: float
) -> tuple[float, float]:
    """A one-sided `confidence` upper bound of the `share` quantile of the distribution
    `values` were drawn from, and the confidence it really has.

    Distribution-free: the k-th smallest value lies above that quantile with probability
    P(Binomial(n, share) <= k - 1); the smallest such k reaching `confidence` is taken,
    or the largest value (confidence 1 - share**n) when n is too small for it."""
    from scipy.stats import binom

    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)
    if n == 0:
        raise ValueError("no values to bound")
    coverage = binom.cdf(np.arange(n), n, share)  # index k - 1 -> P(X_(k) >= quantile)
    reached = np.flatnonzero(coverage >= confidence)
    k = int(reached[0]) + 1 if len(reached) else n
    return float(ordered[k - 1]) * (1 + ROUNDING_MARGIN), float(coverage[k - 1])


def rendered_features(
    features: FeatureFn, render: RenderFn, images: np.ndarray, chunk: int = RENDER_CHUNK
) -> np.ndarray:
    """Features of the renditions of images, a chunk at a time (renditions are not kept)."""
    return np.concatenate(
        [features(render(images[i : i + chunk])) for i in range(0, len(images), chunk)]
    )


def fit_gate(
    features: FeatureFn,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    labels: list[str],
    val_images: np.ndarray,
    target_acceptance: float = TARGET_ACCEPTANCE,
    rotation_images: int = ROTATION_IMAGES,
    components: int = COMPONENTS,
    confidence: float = CONFIDENCE,
    render: RenderFn | None = serving_renditions,
) -> tuple[GateStats, GateInfo]:
    """`render` None: the published images only (the gate of bundles before renditions)."""
    if not 0.5 < target_acceptance <= 1.0:
        raise ValueError("target_acceptance must be in (0.5, 1]")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    rendering = render is not None
    train_features = features(train_images)
    by_class: dict[str, np.ndarray] = {
        label: train_features[train_labels == i] for i, label in enumerate(labels)
    }
    if render is not None:
        rendered = rendered_features(features, render, train_images)
        for i, label in enumerate(labels):
            by_class[label] = np.concatenate([by_class[label], rendered[train_labels == i]])
    # A mis-oriented upload reaches the model through the same decode: rotations of
    # renditions too, so that the upright classes are not the only broadened ones.
    turned = thin(train_images, rotation_images)
    if render is not None:
        turned = np.concatenate([turned, render(turned)])
    for k in QUARTER_TURNS:
        by_class[rotated_class(k)] = features(rotate(turned, k))
    stats, shrinkage = fit_stats(by_class, components)

    # Each validation X-ray counts with the worse distance of its two renditions
    # (published, serving): both must pass; the same for each of its rotations.
    renditions = [val_images] + ([render(val_images)] if render is not None else [])
    val_features = [features(images) for images in renditions]
    val_upright = np.max(
        [_upright_distance(stats, stats.distances(values)) for values in val_features], axis=0
    )
    threshold, threshold_confidence = quantile_upper_bound(
        val_upright, target_acceptance, confidence
    )
    rotated = [
        np.concatenate(
            [
                stats.distances(features(rotate(thin(images, rotation_images), k)))
                for k in QUARTER_TURNS
            ]
        )
        for images in renditions
    ]
    rotated_threshold, rotated_confidence = quantile_upper_bound(
        np.max([_rotated_distance(stats, values) for values in rotated], axis=0),
        target_acceptance,
        confidence,
    )

    bound = (
        f"one-sided {confidence:.0%} upper confidence bound (order statistic) of the "
        f"{target_acceptance:.1%} quantile of the validation split"
    )
    info = GateInfo(
        method=METHOD,
        classes=list(stats.classes),
        threshold=threshold,
        rotated_threshold=rotated_threshold,
        target_acceptance=target_acceptance,
        feature_dim=int(train_features.shape[1]),
        components=int(stats.basis.shape[1]),
        fitted_on={
            "train_images": len(train_images),
            "serving_renditions": (
                "one per training and validation X-ray and per "
                "rotated one (export/serving_renditions.py)"
                if rendering
                else "none"
            ),
            "per_class": {c: len(v) for c, v in by_class.items()},
            "ledoit_wolf_shrinkage": shrinkage,
            "threshold_from": bound + (", each image at its worse rendition" if rendering else ""),
            "threshold_confidence": threshold_confidence,
            "rotated_threshold_confidence": rotated_confidence,
        },
    )
    info.acceptance = measure(
        stats,
        info,
        val_features[0],
        np.concatenate(rotated),
        val_features[1] if rendering else None,
    )
    return stats, info


def measure(
    stats: GateStats,
    info: GateInfo,
    val_features: np.ndarray,
    rotated_distances: np.ndarray,
    rendered_features: np.ndarray | None = None,
) -> dict[str, Any]:
    """What the service's decision does on validation X-rays (as published and as serving
    renditions) and on their rotations."""

    def accepted_share(values: np.ndarray) -> dict[str, Any]:
        verdicts = [decide(stats, info, row) for row in stats.distances(values)]
        accepted = sum(v.accepted for v in verdicts)
        return {
            "n": len(verdicts),
            "accepted": accepted,
            "rate": accepted / len(verdicts) if verdicts else None,
        }

    turned = [decide(stats, info, row) for row in rotated_distances]
    refused_rotated = sum(not v.accepted for v in turned)
    as_rotated = sum(v.refusal is not None and v.refusal.code == ROTATED_IMAGE for v in turned)
    result = {
        "validation": accepted_share(val_features),
        "validation_rotated": {
            "n": len(turned),
            "refused": refused_rotated,
            "as_rotated_image": as_rotated,
            "rate": refused_rotated / len(turned) if turned else None,
        },
    }
    if rendered_features is not None and len(rendered_features):
        result["validation_renditions"] = accepted_share(rendered_features)
    return result


def onnx_features(session, batch_size: int = 32) -> FeatureFn:
    """The `features` output of an onnxruntime session, in batches."""
    from service.bundle import FEATURES_NAME, INPUT_NAME

    def run(images: np.ndarray) -> np.ndarray:
        parts = [
            session.run(
                [FEATURES_NAME], {INPUT_NAME: np.ascontiguousarray(images[i : i + batch_size])}
            )[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts).astype(np.float64)

    return run
