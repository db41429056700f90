"""Tiny ONNX bundles that obey the bundle contract, for tests that need a model but not
a trained one. The graph is a fixed linear read-out of mean brightness, so its outputs
are deterministic and depend on the image (a brighter image scores higher)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.bundle import INPUT_NAME, OUTPUT_NAME, BundleMeta, InputSpec, write_bundle


def make_tiny_onnx(
    path: Path, size: int = 64, n_labels: int = 2, slow_matmuls: int = 0
) -> None:
    """`slow_matmuls` > 0 adds a side chain of that many 512x512 matrix products, whose
    result enters the output multiplied by zero: each model call then costs real compute
    (about the same per call whatever the batch size) and the outputs do not change."""
    weights = np.linspace(-4.0, 4.0, n_labels).astype(np.float32).reshape(1, n_labels)
    bias = np.linspace(2.0, -2.0, n_labels).astype(np.float32)
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
            nodes.append(helper.make_node("MatMul", [f"side_{step}", "mix"],
                                          [f"side_{step + 1}"]))
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
    )
    return write_bundle(directory, onnx_path, meta)
