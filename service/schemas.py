"""Response bodies of the API (pydantic models, with the examples shown in /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from service.bundle import InputSpec

_PROBS_EXAMPLE: JsonDict = {"NORMAL": 0.03, "PNEUMONIA": 0.97}


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code.", examples=["invalid_image"])
    message: str = Field(
        description="What went wrong, for people.",
        examples=["the image could not be decoded: image file is truncated"],
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str = Field(examples=["pneumonia-mobilenet"])
    version: str = Field(examples=["1.0.0"])


class ModelRefWithHash(ModelRef):
    sha256: str = Field(
        description="sha256 of model.onnx, verified at load.",
        examples=["3f2a0c6d9e1b4a7f8c5d2e0b9a6f3c1d4e7b0a9f8c6d5e4f3a2b1c0d9e8f7a6b"],
    )


class ImagePayload(BaseModel):
    """A PNG for people: the heatmap to overlay, or a preview of a DICOM image."""

    media_type: Literal["image/png"] = "image/png"
    width: int = Field(
        description="Pixels; the heatmap has the original image's size.", examples=[1400]
    )
    height: int = Field(examples=[1200])
    data: str = Field(description="The PNG file, base64.", examples=["iVBORw0KGgo..."])


_HEATMAP_DESCRIPTION = (
    "Only with `explain=true`: the class activation map of the positive class from the "
    "same forward pass, sized to the original image. A 16-level palette PNG whose level k "
    "(0..15) is the share k/15 of the strongest positive contribution to the "
    "positive-class logit, coloured blue to red with alpha growing with the level "
    "(level 0 transparent): draw it over the radiograph as it is."
)
_PREVIEW_DESCRIPTION = (
    "Only with `explain=true` and a DICOM upload: the decoded greyscale image as a PNG "
    "(longest side at most 1024 px), for a browser to show under the heatmap."
)


class Prediction(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "label": "PNEUMONIA",
                "screen_positive": True,
                "probabilities": _PROBS_EXAMPLE,
                "positive_probability": 0.97,
                "threshold": 0.41,
                "model": {"name": "pneumonia-mobilenet", "version": "1.0.0"},
                "inference_ms": 6.1,
            }
        }
    )

    label: str = Field(
        description="The screening finding. positive_label of the bundle when "
        "positive_probability >= threshold, else its negative_label. For a model with more "
        "than two labels, the most probable label of the group the threshold chose "
        "(e.g. BACTERIAL or VIRAL when positive).",
        examples=["PNEUMONIA"],
    )
    screen_positive: bool = Field(
        description="positive_probability >= threshold: flag this image for priority review.",
        examples=[True],
    )
    probabilities: dict[str, float] = Field(
        description="Probability of each label of the model; they sum to 1.",
        examples=[_PROBS_EXAMPLE],
    )
    positive_probability: float = Field(
        description="Sum of the probabilities of the model's positive labels.",
        examples=[0.97],
    )
    threshold: float = Field(
        description="Operating threshold of the model, chosen on validation data.",
        examples=[0.41],
    )
    model: ModelRef
    inference_ms: float = Field(
        description="Time spent running the model for this request, in milliseconds.",
        examples=[6.1],
    )
    heatmap: ImagePayload | None = Field(None, description=_HEATMAP_DESCRIPTION)
    preview: ImagePayload | None = Field(None, description=_PREVIEW_DESCRIPTION)


class BatchItem(BaseModel):
    """One file of a batch: either a prediction or an error, never both."""

    filename: str | None = Field(
        None,
        description="The name the client gave the file, without control or bidirectional "
        "formatting characters, at most 255 characters.",
    )
    label: str | None = None
    screen_positive: bool | None = None
    probabilities: dict[str, float] | None = None
    positive_probability: float | None = None
    threshold: float | None = None
    heatmap: ImagePayload | None = Field(None, description=_HEATMAP_DESCRIPTION)
    preview: ImagePayload | None = Field(None, description=_PREVIEW_DESCRIPTION)
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "results": [
                    {
                        "filename": "a.jpeg",
                        "label": "PNEUMONIA",
                        "screen_positive": True,
                        "probabilities": _PROBS_EXAMPLE,
                        "positive_probability": 0.97,
                        "threshold": 0.41,
                    },
                    {
                        "filename": "b.txt",
                        "error": {
                            "code": "unsupported_media_type",
                            "message": "not a JPEG, PNG or DICOM file (unrecognised content)",
                        },
                    },
                ],
                "model": {"name": "pneumonia-mobilenet", "version": "1.0.0"},
                "inference_ms": 11.4,
            }
        }
    )

    results: list[BatchItem] = Field(description="One entry per file, in request order.")
    model: ModelRef
    inference_ms: float = Field(description="Time spent running the model on the batch.")


class ReloadReport(BaseModel):
    """The last model load or reload: what triggered it, whether it worked, what serves."""

    ok: bool = Field(description="Whether the new bundle was loaded, warmed up and switched to.")
    trigger: Literal["startup", "admin", "sighup"] = Field(
        description="startup, POST /admin/reload (admin) or a SIGHUP to the server (sighup)."
    )
    finished_at: datetime
    duration_ms: float = Field(description="Time to read, verify, load and warm up the bundle.")
    serving: ModelRefWithHash | None = Field(
        None, description="The bundle serving after the attempt (the old one when it failed)."
    )
    error: str | None = Field(None, description="Why the new bundle was not switched to.")


class HealthResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "status": "ok",
                "model": {
                    "name": "pneumonia-mobilenet",
                    "version": "1.0.0",
                    "sha256": "3f2a0c6d9e1b4a7f8c5d2e0b9a6f3c1d4e7b0a9f8c6d5e4f3a2b1c0d9e8f7a6b",
                },
                "providers": ["CPUExecutionProvider"],
            }
        }
    )

    status: Literal["ok", "loading", "failed", "draining"]
    model: ModelRefWithHash | None = None
    providers: list[str] = Field(
        default_factory=list, description="onnxruntime execution providers in use."
    )
    error: ErrorDetail | None = Field(None, description="Why the model is not ready.")
    last_reload: ReloadReport | None = Field(
        None, description="The last model load or reload (startup, admin or SIGHUP)."
    )
    gate: Literal["on", "off", "unavailable"] | None = Field(
        None,
        description="The input gate: on, off (GATE_ENABLED=false) or unavailable "
        "(a format 1 bundle has none).",
    )
    heatmaps: Literal["available", "unavailable"] | None = Field(
        None, description="Whether explain=true can add a heatmap (format 2 bundles)."
    )


class LivenessResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ModelInfo(BaseModel):
    name: str = Field(examples=["pneumonia-mobilenet"])
    version: str = Field(examples=["1.0.0"])
    sha256: str
    labels: list[str] = Field(examples=[["NORMAL", "PNEUMONIA"]])
    positive_label: str = Field(examples=["PNEUMONIA"])
    positive_labels: list[str] = Field(examples=[["PNEUMONIA"]])
    negative_label: str = Field(examples=["NORMAL"])
    threshold: float = Field(examples=[0.41])
    input: InputSpec = Field(description="What model.onnx takes, as in the bundle.")
    backbone: str = Field(examples=["mobilenet"])
    validation_metrics: dict[str, Any] = Field(
        examples=[{"auc": 0.97, "sensitivity": 0.95, "specificity": 0.85}]
    )
    training_data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    tool_versions: dict[str, str] = Field(default_factory=dict)
    intended_use: str
    providers: list[str] = Field(default_factory=list)
    last_reload: ReloadReport | None = Field(
        None, description="The last model load or reload (startup, admin or SIGHUP)."
    )
    site_calibration: dict[str, Any] | None = Field(
        None,
        description="How `pneumoscreen calibrate` re-chose the threshold on a site's "
        "own X-rays (docs/site-calibration.md); null for a bundle as exported.",
    )
    gate: dict[str, Any] = Field(
        default_factory=dict,
        description="The input gate: status (on, off, unavailable), its checks, the "
        "refusal codes, thresholds and the acceptance measured at export on the "
        "validation split.",
    )
    heatmaps: Literal["available", "unavailable"] = "unavailable"
