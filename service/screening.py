"""Between the upload and the answer: decode, the input gate, then score and explain.

    prepare(bytes)            -> Prepared: model input + facts, after the gate's cheap checks
    judge(outputs of one run) -> Judged: the feature gate's refusal, or the score (+ heatmap)

Both are blocking and run in the inference executor. They take the per-image dict of
model outputs ({"probabilities", "features", "cam"}), whatever runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from service.bundle import CAM_NAME, FEATURES_NAME, OUTPUT_NAME, BundleMeta
from service.errors import ApiError
from service.gate import GATE_DISTANCES, GateRefusal, InputGate
from service.heatmap import heatmap_payload, preview_payload
from service.image_facts import ImageFacts, read_facts
from service.inference import Scored, score
from service.preprocessing import (
    DICOM,
    DecodeLimits,
    decode_grey_with_header,
    sniff_format,
    to_model_input,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Prepared:
    model_input: np.ndarray
    facts: ImageFacts | None = None
    preview: dict[str, Any] | None = None
    header: Dataset | None = None  # a DICOM input's header, no pixels (reports copy it)


@dataclass(frozen=True)
class Judged:
    scored: Scored | None
    refusal: GateRefusal | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # heatmap, preview


def refusal_error(refusal: GateRefusal) -> ApiError:
    return ApiError(refusal.code, refusal.message)


def explain_unavailable(meta: BundleMeta) -> ApiError:
    return ApiError(
        "explain_unavailable",
        f"explain=true needs a bundle with a class activation output (format 2); the "
        f"served bundle {meta.name} {meta.version} is format {meta.format_version}",
    )


def active(gate: InputGate | None) -> bool:
    return gate is not None and gate.enabled


def prepare(
    data: bytes, meta: BundleMeta, limits: DecodeLimits, gate: InputGate | None, explain: bool
) -> Prepared:
    """Decode (ImageError as before), then the gate's DICOM and pixel checks (GateRefusal)."""
    height, width = meta.input.height, meta.input.width
    preview = None
    grey, header = decode_grey_with_header(data, (height, width), limits)
    model_input = to_model_input(grey, height, width)
    if explain and sniff_format(data) == DICOM:
        # A browser cannot show DICOM: keep the decoded image for a preview.
        preview = preview_payload(grey)
    del grey
    facts = read_facts(data) if explain or active(gate) else None
    if gate is not None and facts is not None:
        gate.check_image(facts, model_input)
    return Prepared(model_input, facts, preview, header)


def judge(
    meta: BundleMeta,
    gate: InputGate | None,
    outputs: dict[str, np.ndarray],
    prepared: Prepared,
    explain: bool,
) -> Judged:
    if gate is not None and FEATURES_NAME in outputs:
        verdict = gate.judge(outputs[FEATURES_NAME], outputs.get(GATE_DISTANCES))
        if verdict is not None and verdict.refusal is not None:
            return Judged(None, verdict.refusal)
    scored = score(meta, outputs[OUTPUT_NAME])
    extras: dict[str, Any] = {}
    if explain:
        facts = prepared.facts
        width = (facts.width if facts else None) or meta.input.width
        height = (facts.height if facts else None) or meta.input.height
        extras["heatmap"] = heatmap_payload(outputs[CAM_NAME], width, height)
        if prepared.preview is not None:
            extras["preview"] = prepared.preview
    return Judged(scored, None, extras)
