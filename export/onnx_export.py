"""Keras run -> ONNX -> parity check -> input gate -> model bundle (format 2).

The graph has three outputs from one forward pass (export/explain_graph.py):
probabilities, features (pooled backbone features) and cam (positive-class activation
map). The bundle is written only after the same real X-rays give the same values for all
three through Keras and through onnxruntime (probabilities: max abs difference <
PARITY_TOLERANCE; features and cam: the same tolerance relative to their largest
magnitude). The gate is then fitted on the ONNX features of the run's training X-rays and
its thresholds set on its validation X-rays (export/gate_fit.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from export.gate_fit import (
    COMPONENTS,
    CONFIDENCE,
    ROTATION_IMAGES,
    TARGET_ACCEPTANCE,
    fit_gate,
    onnx_features,
)
from export.serving_renditions import serving_renditions
from service.bundle import (
    CAM_NAME,
    EXPLAIN_OUTPUTS,
    GATE_FILE,
    INPUT_NAME,
    INTENDED_USE,
    OUTPUT_NAME,
    VALIDATION_METRIC_NAMES,
    BundleMeta,
    InputSpec,
    read_bundle,
    write_bundle,
)
from service.onnx_session import make_session
from training.data import DATA_CREDIT, load_arrays, split_samples
from training.run_record import RunCalibration, RunRecord, read_run

OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 32


class ParityError(RuntimeError):
    """Keras and onnxruntime disagree: the ONNX graph is not the trained model."""


ALL_OUTPUTS = (OUTPUT_NAME, *EXPLAIN_OUTPUTS)


def convert_to_onnx(model, input_size: int, path: Path, opset: int = OPSET) -> None:
    """tf2onnx with an explicit uint8 signature; input `image`; outputs `probabilities`
    (a one-output model) or `probabilities`, `features`, `cam` (explain_model)."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, input_size, input_size, 3), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    graph = proto.graph
    names = [output.name for output in graph.output]
    if len(names) == 1:
        _rename_tensor(graph, names[0], OUTPUT_NAME)
    elif sorted(names) != sorted(ALL_OUTPUTS):
        # explain_model names its output layers; tf2onnx names outputs after them.
        raise RuntimeError(f"expected outputs {list(ALL_OUTPUTS)}, found {names}")
    for value in (graph.input[0], *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _rename_tensor(graph, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for value in graph.output:
        if value.name == old:
            value.name = new


def onnx_predict(onnx_path: Path, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return onnx_outputs(onnx_path, images, batch_size)[OUTPUT_NAME]


def onnx_outputs(
    onnx_path: Path, images: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Every output of the graph, by name, for a stack of model inputs."""
    session = make_session(onnx_path)
    names = [output.name for output in session.get_outputs()]
    parts = [
        session.run(names, {INPUT_NAME: images[i : i + batch_size]})
        for i in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([part[j] for part in parts]) for j, name in enumerate(names)}


def check_parity(model, onnx_path: Path, images: np.ndarray) -> float:
    """Max abs difference of probabilities, Keras vs onnxruntime; raises ParityError."""
    return check_parity_all(model, onnx_path, images)[OUTPUT_NAME]


def check_parity_all(model, onnx_path: Path, images: np.ndarray) -> dict[str, float]:
    """Per output: max abs difference Keras vs onnxruntime (features and cam relative to
    their largest magnitude, at least 1). Raises ParityError beyond PARITY_TOLERANCE."""
    expected = model.predict(images, batch_size=16, verbose=0)
    if not isinstance(expected, dict):
        expected = {OUTPUT_NAME: expected}
    actual = onnx_outputs(onnx_path, images)
    differences = {}
    for name, value in expected.items():
        value = np.asarray(value)
        scale = 1.0 if name == OUTPUT_NAME else max(1.0, float(np.max(np.abs(value))))
        differences[name] = float(np.max(np.abs(value - actual[name]))) / scale
        if not differences[name] < PARITY_TOLERANCE:
            raise ParityError(
                f"Keras and onnxruntime differ by {differences[name]:.2e} on output {name} "
                f"for {len(images)} X-rays (tolerance {PARITY_TOLERANCE:.0e}); the bundle "
                "was not written"
            )
    return differences


def cam_logit_gap(outputs: dict[str, np.ndarray], positive: list[int]) -> float | None:
    """Two labels: max |mean_hw(cam) - log P(pos)/P(neg)| over rows not saturated in
    float32 (the CAM is exact, so this is rounding only)."""
    probabilities = outputs[OUTPUT_NAME].astype(np.float64)
    if probabilities.shape[1] != 2:
        return None
    negative = 1 - positive[0]
    p, q = probabilities[:, positive[0]], probabilities[:, negative]
    usable = (p > 1e-4) & (q > 1e-4)
    if not usable.any():
        return None
    log_odds = np.log(p[usable]) - np.log(q[usable])
    return float(np.max(np.abs(outputs[CAM_NAME][usable].mean(axis=(1, 2)) - log_odds)))


def split_arrays(
    run_dir: Path,
    data_root: Path,
    run: RunRecord,
    part: str,
    cache_dir: Path | None = None,
    limit: int | None = None,
):
    """Model inputs and labels of one side of the run's split, evenly thinned to `limit`."""
    samples = split_samples(run_dir, data_root, part, len(run.labels))
    if limit is not None:
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    return load_arrays(samples, tuple(run.labels), run.image_size, cache_dir)


def export_run(
    run_dir: Path,
    out_dir: Path,
    data_root: Path,
    name: str | None = None,
    version: str = "1.0.0",
    data_source: str = DATA_CREDIT,
    cache_dir: Path | None = None,
    gate_acceptance: float = TARGET_ACCEPTANCE,
    gate_rotation_images: int = ROTATION_IMAGES,
    gate_components: int = COMPONENTS,
    gate_confidence: float = CONFIDENCE,
    gate_renditions: bool = True,
) -> BundleMeta:
    from export.explain_graph import explain_model
    from training.model import load_trained

    run = read_run(run_dir)
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    model = load_trained(run_dir / "model.keras")
    size = run.input_size
    calibration = run.calibration
    threshold = run.threshold
    if calibration:
        fold_temperature(model, calibration.temperature)
        threshold = calibration.threshold
    positive = run.positive_indices()
    explained = explain_model(model, positive)

    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        convert_to_onnx(explained, size, onnx_path)
        # Real X-rays for the parity check: a spread of the run's validation images.
        images, _ = split_arrays(run_dir, data_root, run, "validation", cache_dir, PARITY_IMAGES)
        parity = check_parity_all(explained, onnx_path, images)
        difference = parity[OUTPUT_NAME]
        gap = cam_logit_gap(onnx_outputs(onnx_path, images), positive)
        print(
            "parity: max |keras - onnxruntime| = "
            + ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
            + f" on {len(images)} X-rays; |mean(cam) - log-odds| = "
            + ("n/a" if gap is None else f"{gap:.2e}")
        )

        # The gate: features of every training X-ray, thresholds on the validation ones.
        session = make_session(onnx_path)
        x_train, y_train = split_arrays(run_dir, data_root, run, "train", cache_dir)
        x_val, _ = split_arrays(run_dir, data_root, run, "validation", cache_dir)
        stats, gate = fit_gate(
            onnx_features(session),
            x_train,
            y_train,
            run.labels,
            x_val,
            gate_acceptance,
            gate_rotation_images,
            gate_components,
            gate_confidence,
            serving_renditions if gate_renditions else None,
        )
        gate_path = Path(scratch) / GATE_FILE
        stats.save(gate_path)
        accepted = gate.acceptance["validation"]
        rotated = gate.acceptance["validation_rotated"]
        renditions = gate.acceptance.get("validation_renditions")
        print(
            f"gate: threshold {gate.threshold:.2f}; validation X-rays accepted "
            f"{accepted['accepted']}/{accepted['n']}"
            + (
                f", their serving renditions {renditions['accepted']}/{renditions['n']}"
                if renditions
                else ""
            )
            + f", rotated refused {rotated['refused']}/{rotated['n']}"
        )

        validation = report["splits"]["validation"]
        meta = BundleMeta(
            name=name or f"pneumonia-{run.backbone}-{size}",
            version=version,
            labels=run.labels,
            positive_label=run.positive_label,
            positive_labels=run.positive_labels,
            negative_label=run.negative_label,
            threshold=threshold,
            input=InputSpec(height=size, width=size),
            onnx_sha256="0" * 64,  # write_bundle fills in the real digest
            backbone=run.backbone,
            training_data={
                "source": data_source,
                **run.data.model_dump(),
                "root": Path(run.data.root).name,
                "validation": _validation_text(run),
            },
            validation_metrics={
                **{name: validation[name] for name in VALIDATION_METRIC_NAMES},
                "threshold_rule": report["threshold_rule"],
                "intervals_95": validation.get("intervals_95"),
                "other_splits": {k: v for k, v in report["splits"].items() if k != "validation"},
                "calibration": _calibration_record(calibration, run.threshold),
                "parity_max_abs_diff": difference,
                "parity_by_output": parity,
                "cam_minus_log_odds_max_abs": gap,
            },
            created_at=datetime.now(UTC),
            tool_versions={**run.tool_versions, "onnx_opset": str(OPSET)},
            outputs=list(ALL_OUTPUTS),
            gate=gate,
        )
        meta = write_bundle(out_dir, onnx_path, meta, gate_path)

    shutil.copytree(run_dir / "report", out_dir / "report", dirs_exist_ok=True)
    write_model_card(out_dir, meta, run)
    read_bundle(out_dir)  # what the service will do at start-up
    print(f"bundle written: {out_dir} (sha256 {meta.onnx_sha256[:12]}...)")
    return meta


def fold_temperature(model, temperature: float, layer: str = OUTPUT_NAME) -> None:
    """Divide the softmax head's logits by T by dividing its kernel and bias by T: the graph
    keeps its shape and its outputs become the calibrated probabilities."""
    dense = model.get_layer(layer)
    dense.set_weights([weight / temperature for weight in dense.get_weights()])


def _calibration_record(
    calibration: RunCalibration | None, uncalibrated_threshold: float
) -> dict | None:
    if not calibration:
        return None
    keep = {
        "method",
        "temperature",
        "fitted_on",
        "n",
        "nll_before",
        "nll_after",
        "ece_before",
        "ece_after",
    }
    return {
        **calibration.model_dump(include=keep),
        "folded_into": "the Dense head's weights",
        "uncalibrated_threshold": uncalibrated_threshold,
    }


def _validation_text(run: RunRecord) -> str:
    config = run.config
    if run.validation == "acquisition":
        return (
            f"carved from train by acquisition order: the most recent "
            f"{config.val_fraction:.0%} of patients of each id series"
        )
    if run.validation == "kfold":
        return f"fold {config.fold} of {config.folds} (by patient, stratified, seed {config.seed})"
    return f"carved from train by patient, stratified, seeded (seed {config.seed})"


def write_model_card(out_dir: Path, meta: BundleMeta, run: RunRecord) -> None:
    (out_dir / "MODEL_CARD.md").write_text(model_card(meta, run))


def model_card(meta: BundleMeta, run: RunRecord) -> str:
    """MODEL_CARD.md from the bundle's own metadata (so an INT8 card shows INT8 figures)."""
    v = meta.validation_metrics
    data = meta.training_data
    others = v.get("other_splits", {})
    rows = "".join(
        f"| {name} | {m['n']} | {_fmt(m['auc'])} | {m['sensitivity']:.3f} | "
        f"{m['specificity']:.3f} |\n"
        for name, m in others.items()
    )
    small = [f"{name} ({m['n']} images)" for name, m in others.items() if m["n"] < 100]
    small_note = f" Too few images to mean much: {', '.join(small)}." if small else ""
    if data["source"] == DATA_CREDIT:
        population = (
            "Pediatric patients (1-5 years) of one hospital (Guangzhou Women and "
            "Children's Medical Center), one acquisition pipeline."
        )
    else:
        population = f"Trained on: {data['source']}."
    conversion = (
        f"Keras and onnxruntime agree to {v['parity_max_abs_diff']:.1e} (max abs "
        "difference of probabilities on real X-rays)."
        if "parity_max_abs_diff" in v
        else f"{v.get('quantization', '')}; validation AUC {_fmt(v['auc'])} against "
        f"{_fmt(v.get('fp32_reference', {}).get('auc'))} for the FP32 model."
    )
    weights = run.config.weights
    start = {"imagenet": "ImageNet-pretrained", "none": "randomly initialised, no pretraining"}.get(
        weights, f"ImageNet-pretrained, weights file {Path(weights).name}"
    )
    validation_row = (
        f"| validation ({run.validation_name}) | {v['n']} | {_fmt(v['auc'])} | "
        f"{v['sensitivity']:.3f} | {v['specificity']:.3f} |"
    )
    return f"""# Model card: {meta.name} {meta.version}

## Intended use
{INTENDED_USE}

Input: one frontal pediatric chest radiograph (JPEG, PNG or DICOM) per prediction. Output:
probabilities of {", ".join(meta.labels)} and a screening label at threshold
{meta.threshold:.4f} on P({meta.positive_label}).

## Model
- Backbone: {meta.backbone} ({start}), input {meta.input.height} x {meta.input.width}
  greyscale repeated to 3 channels, uint8; global average pooling, dropout, linear softmax head.
- Fine-tuned in two phases (frozen backbone, then top layers), class-weighted, with
  geometric and exposure augmentation (no flips). {run.epochs_run} epochs,
  {run.wall_time_s / 60:.0f} min on the training machine{_members_note(run)}.
{_recipe_text(run)}- ONNX (opset {OPSET}). {conversion}

## Data
{data["source"]}

Training: {data["train_images"]} images of {data["train_patients"]} patients
{data["train_counts"]}. Validation: {data["validation_images"]} images of
{data["validation_patients"]} other patients {data["validation_counts"]},
{data["validation"]} (no patient on both sides).

## Metrics
Threshold: {v.get("threshold_rule", "chosen on the validation split")}.

| split | images | AUC | sensitivity | specificity |
|---|---|---|---|---|
{validation_row}
{rows}{_intervals_text(v)}{_calibration_text(v)}
Accuracy {v["accuracy"]:.3f}, precision {v["precision"]:.3f}, F1 {v["f1"]:.3f};
confusion matrix {v["confusion_matrix"]}.{small_note} Figures: report/metrics.json,
report/roc.png, report/confusion_matrix.png.

{_gate_section(meta)}
## Limits
- {population} Performance on other populations, hospitals, devices or portable films is
  unknown; published results on the Kermany data set show test-set specificity well below
  validation specificity.
- Validation images come from the same source and period as training; expect lower
  figures elsewhere. Sensitivity was fixed on validation, not on the deployment population.
- Not a diagnosis. Not cleared as a medical device. A clinician reads every image.
"""


def _members_note(run: RunRecord) -> str:
    return " (all members together)" if run.ensemble else ""


def _recipe_text(run: RunRecord) -> str:
    """Card lines for what changes the graph itself: the intensity stretch, an ensemble."""
    lines = ""
    if run.config.intensity_stretch:
        lines += (
            "- Each image's 1st and 99th grey-level percentiles are stretched to 0 and "
            "255 inside the model (training.model.PercentileStretch).\n"
        )
    if run.ensemble:
        lines += (
            f"- An ensemble of {len(run.ensemble.members)} runs in one graph: "
            f"{run.ensemble.combination}. Members: "
            f"{', '.join(Path(m).name for m in run.ensemble.members)}.\n"
        )
    return lines


def _intervals_text(v: dict) -> str:
    ci = v.get("intervals_95")
    if not ci:
        return ""
    parts = [
        f"{name} [{low:.3f}, {high:.3f}]"
        for name, bounds in ci.items()
        if bounds
        for low, high in [bounds]
    ]
    return (
        "\n95% intervals on the validation split (1000 bootstrap resamples of patients): "
        + ", ".join(parts)
        + ".\n"
    )


def _calibration_text(v: dict) -> str:
    c = v.get("calibration")
    if not c:
        return ""
    return (
        f"\nCalibration: {c['method']}, T = {c['temperature']:.3f}, fitted on "
        f"{c['fitted_on']} and folded into {c['folded_into']}; expected calibration error "
        f"{c['ece_before']:.4f} -> {c['ece_after']:.4f} (10 bins), NLL "
        f"{c['nll_before']:.4f} -> {c['nll_after']:.4f}. The threshold "
        f"{c['uncalibrated_threshold']:.4f} on the uncalibrated scale is the same decision. "
        "Reliability diagram: report/reliability.png.\n"
    )


def _gate_section(meta: BundleMeta) -> str:
    gate = meta.gate
    if gate is None:
        return "## Input gate\nNone (bundle format 1): every decodable image is scored.\n"
    accepted = gate.acceptance.get("validation", {})
    rotated = gate.acceptance.get("validation_rotated", {})
    threshold_from = gate.fitted_on.get(
        "threshold_from", f"set so that {gate.target_acceptance:.1%} of the validation X-rays pass"
    )
    return f"""## Input gate
Before scoring, the service refuses images that are not upright frontal chest X-rays
(422 `not_chest_xray`, `unsupported_view`, `rotated_image`): DICOM tags, colour, blank
images, aspect ratio, then the Mahalanobis distance of the model's own pooled features
to the training X-rays (threshold {gate.threshold:.2f}: {threshold_from}). On the
validation split it
accepted {accepted.get("accepted")} of {accepted.get("n")} X-rays and refused
{rotated.get("refused")} of {rotated.get("n")} rotated copies. `explain=true` adds a
class activation map of the positive class (exact for the linear head).
"""


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
