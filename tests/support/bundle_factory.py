"""Tiny ONNX bundles that obey the bundle contract, for tests that need a model but not
a trained one. The graph is a fixed linear read-out of mean brightness, so its outputs
are deterministic and depend on the image (a brighter image scores higher).

`make_tiny_bundle` writes a format 1 bundle (probabilities only). `make_tiny_gated_bundle`
writes a format 2 one: the same read-out, plus `features` (an 8 x 8 grid of cell
brightness and cell texture, 128 values: a crude but real description of the picture)
and `cam` (each cell's brightness contribution to the logit difference, so its mean over
cells is exactly log P(positive)/P(negative)), with a gate fitted by the export's own
code on the features of the fixture X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.bundle import (
    CAM_NAME,
    EXPLAIN_OUTPUTS,
    FEATURES_NAME,
    GATE_FILE,
    INPUT_NAME,
    OUTPUT_NAME,
    BundleMeta,
    InputSpec,
    write_bundle,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GRID = 8


def make_tiny_onnx(path: Path, size: int = 64, n_labels: int = 2, slow_matmuls: int = 0) -> None:
    """`slow_matmuls` > 0 adds a side chain of that many 512x512 matrix products, whose
    result enters the output multiplied by zero: each model call then costs real compute
    (about the same per call whatever the batch size) and the outputs do not change."""
    weights, bias = _readout(n_labels)
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["unit"]),
        helper.make_node("ReduceMean", ["unit", "axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "unsq_axes"], ["column"]),
        helper.make_node("MatMul", ["column", "weights"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]
    initializer = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "unsq_axes"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(bias, "bias"),
    ]
    if slow_matmuls > 0:
        # The chain starts from the input (mean brightness of the batch), so onnxruntime
        # cannot fold it into a constant at load time. Rows of `mix` sum to 1, so the
        # values stay bounded and `* 0` is exactly 0.
        nodes[-2:] = [helper.make_node("Add", ["logits_nobias", "bias"], ["logits_plain"])]
        nodes += [
            helper.make_node("ReduceMean", ["mean"], ["batch_mean"], keepdims=0),
            helper.make_node("Mul", ["mix", "batch_mean"], ["side_0"]),
        ]
        for step in range(slow_matmuls):
            nodes.append(helper.make_node("MatMul", [f"side_{step}", "mix"], [f"side_{step + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"side_{slow_matmuls}"], ["side_sum"], keepdims=0),
            helper.make_node("Mul", ["side_sum", "zero"], ["side_zero"]),
            helper.make_node("Add", ["logits_plain", "side_zero"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
        ]
        initializer += [
            numpy_helper.from_array(np.full((512, 512), 1 / 512, dtype=np.float32), "mix"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny-brightness",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_labels])],
        initializer=initializer,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def make_tiny_bundle(
    directory: Path,
    size: int = 64,
    labels: tuple[str, ...] = ("NORMAL", "PNEUMONIA"),
    threshold: float = 0.5,
    name: str = "tiny-test-model",
    version: str = "0.0.1",
    slow_matmuls: int = 0,
) -> BundleMeta:
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    make_tiny_onnx(onnx_path, size=size, n_labels=len(labels), slow_matmuls=slow_matmuls)
    positives = [label for label in labels if label != "NORMAL"]
    meta = BundleMeta(
        name=name,
        version=version,
        labels=list(labels),
        positive_label="PNEUMONIA",
        positive_labels=positives,
        negative_label="NORMAL",
        threshold=threshold,
        input=InputSpec(height=size, width=size),
        onnx_sha256="0" * 64,
        backbone="none (test graph)",
        training_data={"description": "untrained test graph"},
        format_version=1,
    )
    return write_bundle(directory, onnx_path, meta)


def _readout(n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    weights = np.linspace(-4.0, 4.0, n_labels).astype(np.float32).reshape(1, n_labels)
    bias = np.linspace(2.0, -2.0, n_labels).astype(np.float32)
    return weights, bias


def make_tiny_explain_onnx(path: Path, size: int = 64, n_labels: int = 2) -> None:
    """probabilities as make_tiny_onnx, plus features [batch, 128] and cam [batch, 8, 8]."""
    if size % GRID:
        raise ValueError(f"size must be a multiple of {GRID}")
    weights, bias = _readout(n_labels)
    # The CAM direction: mean positive logit minus negative logit (label 0 is NORMAL).
    w_diff = np.float32(weights[0, 1:].mean() - weights[0, 0])
    b_diff = np.float32(bias[1:].mean() - bias[0])
    cell = size // GRID
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["as_float", "scale"], ["unit"]),
        helper.make_node("ReduceMean", ["unit", "channel_axis"], ["grey_nhwc"], keepdims=1),
        helper.make_node("Transpose", ["grey_nhwc"], ["grey"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "AveragePool", ["grey"], ["brightness"], kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node(
            "AveragePool",
            ["grey"],
            ["local_mean"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Sub", ["grey", "local_mean"], ["detail"]),
        helper.make_node("Abs", ["detail"], ["abs_detail"]),
        helper.make_node(
            "AveragePool",
            ["abs_detail"],
            ["texture_raw"],
            kernel_shape=[cell, cell],
            strides=[cell, cell],
        ),
        helper.make_node("Mul", ["texture_raw", "texture_gain"], ["texture"]),
        helper.make_node("Concat", ["brightness", "texture"], ["feature_map"], axis=1),
        helper.make_node("Flatten", ["feature_map"], [FEATURES_NAME], axis=1),
        helper.make_node("ReduceMean", ["brightness", "grid_axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
        helper.make_node("Squeeze", ["brightness", "channel_squeeze"], ["brightness_map"]),
        helper.make_node("Mul", ["brightness_map", "w_diff"], ["cam_nobias"]),
        helper.make_node("Add", ["cam_nobias", "b_diff"], [CAM_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-brightness-explain",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_labels]),
            helper.make_tensor_value_info(
                FEATURES_NAME, TensorProto.FLOAT, ["batch", 2 * GRID * GRID]
            ),
            helper.make_tensor_value_info(CAM_NAME, TensorProto.FLOAT, ["batch", GRID, GRID]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([3], dtype=np.int64), "channel_axis"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "grid_axes"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "channel_squeeze"),
            numpy_helper.from_array(np.array(10.0, dtype=np.float32), "texture_gain"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array(w_diff, dtype=np.float32), "w_diff"),
            numpy_helper.from_array(np.array(b_diff, dtype=np.float32), "b_diff"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def fixture_inputs(size: int, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and label indices (0 NORMAL, 1 PNEUMONIA) of a fixture split."""
    from service.preprocessing import load_model_input

    paths = sorted((FIXTURES / "chest_xray" / folder).glob("*/*.jpeg"))
    images = np.stack([load_model_input(p.read_bytes(), size, size) for p in paths])
    labels = np.array([int(p.parent.name != "NORMAL") for p in paths])
    return images, labels


def make_tiny_gated_bundle(
    directory: Path,
    size: int = 64,
    threshold: float = 0.5,
    target_acceptance: float = 0.995,
    name: str = "tiny-gated-test-model",
    version: str = "0.0.2",
) -> BundleMeta:
    """A format 2 bundle whose gate was fitted on the fixture X-rays' tiny features:
    classes and rotations on fixtures/chest_xray/train, thresholds on .../val."""
    from export.gate_fit import fit_gate, onnx_features
    from service.onnx_session import make_session

    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    make_tiny_explain_onnx(onnx_path, size=size)
    session = make_session(onnx_path)
    train, train_labels = fixture_inputs(size, "train")
    val, _ = fixture_inputs(size, "val")
    # Without serving renditions: the untrained test graph's features barely see
    # orientation (a 180-degree fixture then lands level with the upright classes), so the
    # renditions' wider upright classes would make these end-to-end checks a coin toss.
    # The renditions are tested in tests/export/test_gate_fit_units.py and measured on a
    # trained bundle with bench/gate_eval.py.
    stats, info = fit_gate(
        onnx_features(session),
        train,
        train_labels,
        ["NORMAL", "PNEUMONIA"],
        val,
        target_acceptance,
        render=None,
    )
    stats.save(directory / GATE_FILE)
    meta = BundleMeta(
        name=name,
        version=version,
        labels=["NORMAL", "PNEUMONIA"],
        positive_label="PNEUMONIA",
        positive_labels=["PNEUMONIA"],
        negative_label="NORMAL",
        threshold=threshold,
        input=InputSpec(height=size, width=size),
        onnx_sha256="0" * 64,
        backbone="none (test graph)",
        training_data={"description": "untrained test graph; gate fitted on test fixtures"},
        outputs=[OUTPUT_NAME, *EXPLAIN_OUTPUTS],
        gate=info,
    )
    return write_bundle(directory, onnx_path, meta, directory / GATE_FILE)
