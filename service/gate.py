"""The input gate: refuse what is not an upright frontal chest X-ray instead of scoring it.

Checks, cheapest first; the first that fails answers 422 with its code:

1. DICOM tags, when present: Modality not a radiograph (CR, DX, DR) or BodyPartExamined
   not the chest -> `not_chest_xray`; a lateral or oblique ViewPosition -> `unsupported_view`.
2. The decoded image: strongly coloured, blank or near-uniform, or an extreme aspect
   ratio -> `not_chest_xray`.
3. The model's own pooled features (the `features` output of the same forward pass),
   projected on their top principal components (fitted at export): Mahalanobis distance
   to Gaussian classes fitted at export on the training X-rays (one per label) and on the
   same X-rays turned by 90, 180 and 270 degrees, with one shared covariance. Nearest class
   upright and within `threshold` -> scored; nearest
   class rotated and within `rotated_threshold` -> `rotated_image`; otherwise
   `not_chest_xray`. The thresholds were set at export so that the target share of the
   validation X-rays (and of their rotations) fall within them (model.json `gate`).

Pure numpy; nothing here knows about HTTP. A format 1 bundle has no features output and
no statistics: it gets no gate at all and is served as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.bundle import BundleError, BundleMeta, GateInfo
from service.image_facts import ImageFacts

NOT_CHEST_XRAY = "not_chest_xray"
UNSUPPORTED_VIEW = "unsupported_view"
ROTATED_IMAGE = "rotated_image"
GATE_CODES = (NOT_CHEST_XRAY, UNSUPPORTED_VIEW, ROTATED_IMAGE)

# DICOM: radiograph modalities (DR is not a defined term, but vendors write it).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})
OBLIQUE_VIEWS = frozenset({"LLO", "RLO", "OBLIQUE"})

# Pixels. X-rays of the data set: colour share 0.0, aspect ratio at most 2.17, grey
# standard deviation far above 20 (bench/gate_eval.py measures them all).
MAX_COLOUR_SHARE = 0.05
MAX_ASPECT_RATIO = 3.0
MIN_GREY_STD = 8.0

ROTATED_PREFIX = "ROTATED_"

# The gate's distances of each image to its classes, added to a served model's outputs
# (service.inference.LoadedModel.run computes them for the whole batch).
GATE_DISTANCES = "gate_distances"


class GateRefusal(ValueError):
    """The gate refuses an image: `code` is one of GATE_CODES, `message` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GateStats:
    """Gaussian classes with a shared precision matrix, in the principal subspace of the
    features (gate.npz): z = (features - center) @ basis."""

    classes: tuple[str, ...]
    center: NDArray[np.float64]  # (D,) float64
    basis: NDArray[np.float64]  # (D, k) float64, orthonormal columns
    means: NDArray[np.float64]  # (K, k) float64
    precision: NDArray[np.float64]  # (k, k) float64, symmetric positive definite

    @property
    def upright(self) -> np.ndarray:
        return np.array([not c.startswith(ROTATED_PREFIX) for c in self.classes])

    def project(self, features: np.ndarray) -> NDArray[np.float64]:
        return (np.asarray(features, dtype=np.float64) - self.center) @ self.basis

    def distances(self, features: np.ndarray) -> NDArray[np.float64]:
        """Mahalanobis distances (N, K) of features (N, D) to every class mean."""
        z = self.project(features)
        diff = z[:, None, :] - self.means[None, :, :]
        squared: NDArray[np.float64] = np.einsum("nkd,nkd->nk", diff @ self.precision, diff)
        return np.sqrt(np.clip(squared, 0.0, None))

    def save(self, path: Path) -> None:
        # float64: a precision matrix of small-valued features overflows float32.
        np.savez(
            path,
            classes=np.array(self.classes),
            center=self.center,
            basis=self.basis,
            means=self.means,
            precision=self.precision,
        )

    @classmethod
    def load(cls, path: Path) -> GateStats:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(
                classes=tuple(str(c) for c in arrays["classes"]),
                **{
                    name: np.asarray(arrays[name], dtype=np.float64)
                    for name in ("center", "basis", "means", "precision")
                },
            )


@dataclass(frozen=True)
class Verdict:
    """The feature gate's decision for one image."""

    accepted: bool
    nearest: str
    distance: float  # to the nearest upright class
    refusal: GateRefusal | None = None


def decide(stats: GateStats, info: GateInfo, distances: np.ndarray) -> Verdict:
    """One row of `GateStats.distances` -> accept, rotated_image or not_chest_xray."""
    upright = stats.upright
    nearest = int(np.argmin(distances))
    upright_distance = float(np.min(distances[upright]))
    name = stats.classes[nearest]
    if upright[nearest]:
        if upright_distance <= info.threshold:
            return Verdict(True, name, upright_distance)
        return Verdict(
            False,
            name,
            upright_distance,
            GateRefusal(
                NOT_CHEST_XRAY,
                "this does not look like a frontal chest X-ray to the model (feature distance "
                f"{upright_distance:.1f} to the training X-rays, the gate accepts up to "
                f"{info.threshold:.1f}); it was not scored",
            ),
        )
    rotated_distance = float(distances[nearest])
    if rotated_distance <= info.rotated_threshold:
        degrees = name.removeprefix(ROTATED_PREFIX)
        return Verdict(
            False,
            name,
            upright_distance,
            GateRefusal(
                ROTATED_IMAGE,
                f"the X-ray looks rotated by {degrees} degrees counter-clockwise; send it "
                "upright (head at the top): a rotated image is not scored",
            ),
        )
    return Verdict(
        False,
        name,
        upright_distance,
        GateRefusal(
            NOT_CHEST_XRAY,
            "this does not look like a chest X-ray to the model, upright or rotated (feature "
            f"distance {upright_distance:.1f}, the gate accepts up to {info.threshold:.1f}); it "
            "was not scored",
        ),
    )


def check_dicom_tags(facts: ImageFacts) -> None:
    tags = facts.dicom
    if tags is None:
        return
    if tags.modality is not None and tags.modality not in RADIOGRAPH_MODALITIES:
        raise GateRefusal(
            NOT_CHEST_XRAY, f"DICOM Modality is {tags.modality}, not a radiograph (CR, DX or DR)"
        )
    if tags.body_part is not None and tags.body_part not in CHEST_BODY_PARTS:
        raise GateRefusal(NOT_CHEST_XRAY, f"DICOM BodyPartExamined is {tags.body_part}, not CHEST")
    view = tags.view_position
    if view in LATERAL_VIEWS or view in OBLIQUE_VIEWS:
        kind = "a lateral" if view in LATERAL_VIEWS else "an oblique"
        raise GateRefusal(
            UNSUPPORTED_VIEW,
            f"DICOM ViewPosition {view} is {kind} view; "
            "the model reads frontal (PA or AP) chest X-rays only",
        )


def check_pixels(facts: ImageFacts, model_input: np.ndarray) -> None:
    """Cheap checks on the image itself, before the model runs."""
    if facts.colour_share > MAX_COLOUR_SHARE:
        raise GateRefusal(
            NOT_CHEST_XRAY,
            f"the image is strongly coloured "
            f"({facts.colour_share:.0%} of its pixels); an X-ray is greyscale",
        )
    if facts.width and facts.height:
        ratio = max(facts.width, facts.height) / min(facts.width, facts.height)
        if ratio > MAX_ASPECT_RATIO:
            raise GateRefusal(
                NOT_CHEST_XRAY,
                f"the image is {facts.width}x{facts.height} "
                f"px (aspect ratio {ratio:.1f}); a chest X-ray is at most "
                f"{MAX_ASPECT_RATIO:.0f}:1",
            )
    std = float(np.std(model_input[..., 0]))
    if std < MIN_GREY_STD:
        raise GateRefusal(
            NOT_CHEST_XRAY,
            f"the image is blank or nearly uniform (grey "
            f"level standard deviation {std:.1f} of 255)",
        )


class InputGate:
    """The gate of one bundle: its statistics, thresholds and whether it is switched on."""

    def __init__(self, info: GateInfo, stats: GateStats, enabled: bool) -> None:
        k = stats.basis.shape[1]
        if (
            stats.basis.shape[0] != info.feature_dim
            or stats.center.shape != (info.feature_dim,)
            or stats.means.shape != (len(info.classes), k)
            or stats.precision.shape != (k, k)
        ):
            raise BundleError(
                f"gate statistics do not fit model.json: {len(info.classes)} "
                f"classes of {info.feature_dim} features"
            )
        if stats.classes != tuple(info.classes):
            raise BundleError("gate.npz and model.json list different gate classes")
        self.info = info
        self.stats = stats
        self.enabled = enabled

    @classmethod
    def load(cls, directory: Path, meta: BundleMeta, enabled: bool) -> InputGate | None:
        """The gate of a format 2 bundle (read_bundle verified its sha256), else None."""
        if meta.gate is None or not meta.has_explain_outputs:
            return None
        return cls(meta.gate, GateStats.load(directory / meta.gate.file), enabled)

    def check_image(self, facts: ImageFacts, model_input: np.ndarray) -> None:
        """DICOM tags and pixels, before the model; raises GateRefusal."""
        if self.enabled:
            check_dicom_tags(facts)
            check_pixels(facts, model_input)

    def judge(self, features: np.ndarray, distances: np.ndarray | None = None) -> Verdict | None:
        """The feature gate for one image's `features` row (None when switched off);
        `distances`: that row's `GateStats.distances`, when already computed."""
        if not self.enabled:
            return None
        if distances is None:
            row = np.asarray(features, dtype=np.float64).reshape(1, -1)
            distances = self.stats.distances(row)[0]
        return decide(self.stats, self.info, distances)

    def card(self) -> dict[str, Any]:
        """What /model says about the gate."""
        return {
            "status": "on" if self.enabled else "off",
            "codes": list(GATE_CODES),
            **self.info.model_dump(exclude={"file"}),
            "checks": describe_checks(),
        }


def describe_checks() -> list[str]:
    modalities = ", ".join(sorted(RADIOGRAPH_MODALITIES))
    views = ", ".join(sorted(LATERAL_VIEWS | OBLIQUE_VIEWS))
    parts = " or ".join(sorted(CHEST_BODY_PARTS))
    return [
        f"DICOM Modality, when present, one of {modalities}; else not_chest_xray",
        f"DICOM BodyPartExamined, when present, {parts}; else not_chest_xray",
        f"DICOM ViewPosition {views}: unsupported_view",
        f"more than {MAX_COLOUR_SHARE:.0%} clearly coloured pixels: not_chest_xray",
        f"aspect ratio above {MAX_ASPECT_RATIO:.0f}:1: not_chest_xray",
        f"grey level standard deviation below {MIN_GREY_STD:.0f} (blank): not_chest_xray",
        (
            "Mahalanobis distance of the model's pooled features (principal subspace) to the "
            "nearest training class above threshold: not_chest_xray; nearest class rotated: "
            "rotated_image"
        ),
    ]


def unavailable_card(meta: BundleMeta | None) -> dict[str, Any]:
    version = meta.format_version if meta is not None else None
    return {
        "status": "unavailable",
        "reason": f"the bundle (format {version}) has no features output and no gate "
        "statistics; re-export it with this version for the gate",
    }
