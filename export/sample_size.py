"""How many labelled patients a site needs before its own threshold can be trusted.

The rule (docs/site-calibration.md). The threshold rule keeps k = ceil(target * n) of the
n positives at or above the threshold, so the sensitivity measured on the site is k / n,
at least the target by construction. That figure means something only when its 95%
interval is tight: the lower bound of the two-sided 95% Wilson score interval of k / n
must reach `target - margin`. That bound zig-zags with the rounding of ceil(target * n),
so the count needed is the smallest n from which it holds for every larger n.

Negatives do not move the threshold; they measure specificity. A site must bring at least
as many of them as positives needed, so a specificity near the target is known to the
same precision.

Counts are of patients, not images: several films of one child are not independent
evidence. Pure numpy and the standard library (serving install).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)  # 1.96: two-sided 95%
DEFAULT_MARGIN = 0.05
# Counts are searched up to here; a (target, margin) needing more is "not supportable".
MAX_COUNT = 200_000


def kept_positives(target: float, n: int) -> int:
    """How many of n positives the threshold rule keeps at or above the threshold
    (the same rounding as service.scoring.choose_threshold)."""
    return max(math.ceil(target * n - 1e-9), 1)


def wilson_interval(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Two-sided Wilson score interval of the proportion k / n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0 (got k={k}, n={n})")
    lower, upper = _wilson_bounds(np.array([k], dtype=float), np.array([n], dtype=float), z)
    return float(lower[0]), float(upper[0])


def _wilson_bounds(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def check_target(target: float, margin: float) -> None:
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target sensitivity must be in (0, 1), got {target}")
    if not 0.0 < margin < target:
        raise ValueError(f"the margin must be in (0, target), got {margin}")


def positives_needed(target: float, margin: float = DEFAULT_MARGIN) -> int | None:
    """The fewest positive patients from which, for every larger count too, the Wilson
    lower bound of the rule's sensitivity reaches target - margin; None if no count up to
    MAX_COUNT does."""
    check_target(target, margin)
    n = np.arange(1, MAX_COUNT + 1, dtype=float)
    k = np.maximum(np.ceil(target * n - 1e-9), 1.0)
    lower, _ = _wilson_bounds(k, n, Z)
    # A float tolerance: a bound equal to the floor up to rounding counts as reaching it.
    reaches = lower >= target - margin - 1e-12
    if not reaches[-1]:
        return None
    failing = np.flatnonzero(~reaches)
    return int(failing[-1]) + 2 if failing.size else 1


@dataclass(frozen=True)
class Sufficiency:
    """Whether a site's counts support the target, and what the rule asked for."""

    target: float
    margin: float
    positives: int  # patients with a positive finding at the site
    negatives: int
    positives_needed: int | None
    negatives_needed: int | None

    @property
    def enough(self) -> bool:
        return (
            self.positives_needed is not None
            and self.negatives_needed is not None
            and self.positives >= self.positives_needed
            and self.negatives >= self.negatives_needed
        )

    def rule(self) -> str:
        return (
            f"enough positives when the lower bound of the two-sided {CONFIDENCE:.0%} Wilson "
            f"interval of the sensitivity the threshold rule keeps (ceil(target * n) of n) "
            f"reaches target - margin = {self.target - self.margin:.4g} for this count of "
            f"positive patients and every larger one; at least as many negative patients "
            f"(or --min-negatives)"
        )

    def shortfall(self, positive_label: str, negative_label: str) -> str | None:
        """The one-line reason to refuse, or None when the counts are enough."""
        floor = self.target - self.margin
        if self.positives_needed is None:
            return (
                f"no site of up to {MAX_COUNT:,} patients can show sensitivity "
                f"{self.target:g} to within a margin of {self.margin:g}; "
                "use a larger --margin"
            )
        parts = []
        if self.positives < self.positives_needed:
            parts.append(
                f"{self.positives} {positive_label} patients, at least "
                f"{self.positives_needed} are needed (the lower bound of the 95% interval "
                f"on sensitivity must reach {floor:.4g})"
            )
        if self.negatives_needed is not None and self.negatives < self.negatives_needed:
            parts.append(
                f"{self.negatives} {negative_label} patients, at least "
                f"{self.negatives_needed} are needed"
            )
        if not parts:
            return None
        return f"too few site X-rays to support target sensitivity {self.target:g}: " + "; ".join(
            parts
        )


def assess(
    target: float, margin: float, positives: int, negatives: int, min_negatives: int | None = None
) -> Sufficiency:
    """Apply the rule to a site's patient counts."""
    needed = positives_needed(target, margin)
    negatives_needed = min_negatives if min_negatives is not None else needed
    return Sufficiency(target, margin, positives, negatives, needed, negatives_needed)
