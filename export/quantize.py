"""Optional INT8 bundle: onnxruntime static quantization (QDQ, per-channel weights).

Calibrated on training images (never validation), then measured on the patient-level
validation split through onnxruntime next to the FP32 model it came from. The INT8 bundle
carries both figures, so nobody deploys it on faith.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from export.gate_fit import fit_gate, onnx_features
from export.onnx_export import onnx_predict, split_arrays, write_model_card
from service.bundle import GATE_FILE, INPUT_NAME, BundleMeta, read_bundle, write_bundle
from service.onnx_session import make_session
from training.metrics import binary_metrics, choose_threshold, positive_scores
from training.run_record import read_run

CALIBRATION_IMAGES = 256


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a uint8 array."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self._batches = iter(
            [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_bundle(
    fp32_dir: Path, out_dir: Path, run_dir: Path, data_root: Path, cache_dir: Path | None = None
) -> BundleMeta:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = read_bundle(fp32_dir)
    run = read_run(run_dir)
    calibration, _ = split_arrays(run_dir, data_root, run, "train", cache_dir, CALIBRATION_IMAGES)
    x_val, y_val = split_arrays(run_dir, data_root, run, "validation", cache_dir)

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quantized = Path(scratch) / "model.onnx"
        quant_pre_process(str(fp32_dir / "model.onnx"), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        positives = fp32.positive_indices()
        y_positive = np.isin(y_val, positives)
        fp32_scores = positive_scores(onnx_predict(fp32_dir / "model.onnx", x_val), positives)
        int8_scores = positive_scores(onnx_predict(quantized, x_val), positives)
        fp32_metrics = binary_metrics(y_positive, fp32_scores, fp32.threshold)
        # Quantization moves scores a little: the same rule picks the INT8 model's own threshold.
        threshold = choose_threshold(y_positive, int8_scores, run.target_sensitivity)
        int8_metrics = binary_metrics(y_positive, int8_scores, threshold)
        print(
            f"validation AUC through onnxruntime: FP32 {fp32_metrics['auc']:.4f}, "
            f"INT8 {int8_metrics['auc']:.4f}; at threshold {threshold:.4f} INT8 "
            f"sensitivity {int8_metrics['sensitivity']:.3f}, "
            f"specificity {int8_metrics['specificity']:.3f}"
        )
        meta = fp32.model_copy(
            update={
                "name": f"{fp32.name}-int8",
                "threshold": threshold,
                "validation_metrics": {
                    **int8_metrics,
                    "quantization": "onnxruntime static, QDQ, per-channel int8 weights, uint8 "
                    f"activations, {len(calibration)} training images",
                    "fp32_reference": fp32_metrics,
                    "max_abs_diff_vs_fp32": float(np.max(np.abs(int8_scores - fp32_scores))),
                },
            }
        )
        gate_path = None
        if fp32.gate is not None:
            # INT8 features differ from the FP32 ones: the gate is fitted again on them.
            session = make_session(quantized)
            x_train, y_train = split_arrays(run_dir, data_root, run, "train", cache_dir)
            stats, gate = fit_gate(
                onnx_features(session),
                x_train,
                y_train,
                fp32.labels,
                x_val,
                fp32.gate.target_acceptance,
                components=fp32.gate.components,
            )
            gate_path = Path(scratch) / GATE_FILE
            stats.save(gate_path)
            meta = meta.model_copy(update={"gate": gate})
        meta = write_bundle(out_dir, quantized, meta, gate_path)
    write_model_card(out_dir, meta, run)
    read_bundle(out_dir)
    return meta
