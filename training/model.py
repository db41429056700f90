"""The classifier: ImageNet backbone + linear head, taking uint8 pixels.

    image uint8 (H, W, 3) -> [percentile stretch] -> the backbone's own input scaling
        -> backbone -> GlobalAveragePooling -> Dropout -> Dense(n_labels, softmax)

The scaling lives inside the model, so the exported ONNX graph takes the service's uint8
arrays as they are. The head stays linear after pooling, which keeps an exact class
activation map possible (weights of the Dense layer times the last feature maps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import ops


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str  # attribute of keras.applications
    # Both published backbones expect [-1, 1] (x / 127.5 - 1), as their preprocess_input does.
    scale: float
    offset: float
    default_size: int
    # How many layers from the top phase 2 unfreezes (whole blocks, BatchNorm stays frozen).
    fine_tune_layers: int


BACKBONES = {
    "mobilenet": Backbone("mobilenet", "MobileNet", 1 / 127.5, -1.0, 224, 24),
    "xception": Backbone("xception", "Xception", 1 / 127.5, -1.0, 299, 26),
    "mobilenetv2": Backbone("mobilenetv2", "MobileNetV2", 1 / 127.5, -1.0, 224, 30),
}


@keras.saving.register_keras_serializable(package="pneumoscreen")
class PercentileStretch(keras.layers.Layer):
    """Per image, map its `low` and `high` grey-level percentiles to 0 and 255 (clipped).

    Issue 13's lead: the 1st-99th percentile spread alone separates the training classes
    (AUC 0.84), partly an acquisition cue (exposure, post-processing) that moves with the
    machine. Stretching every image to the same spread removes the linear part of that cue
    from the model's view. It lives in the graph, so training (after augmentation),
    evaluation and the exported ONNX model apply the same arithmetic, and the service's
    preprocessing and the bundle contract stay as they are.

    The percentiles are taken on a 4x4 average-pooled copy (noise-robust and cheap: TopK
    over 3136 values at 224 px).
    """

    def __init__(self, low: float = 0.01, high: float = 0.99, pool: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError("need 0 <= low < high <= 1")
        self.low, self.high, self.pool = low, high, pool

    def call(self, images):
        x = ops.cast(images, "float32")
        grey = ops.mean(x, axis=-1, keepdims=True)
        small = ops.average_pool(grey, pool_size=self.pool, strides=self.pool)
        flat = ops.reshape(small, (ops.shape(small)[0], -1))
        n = small.shape[1] * small.shape[2]
        # The value at a percentile is the k-th largest (or smallest) of the n values.
        k_high = max(1, math.ceil((1.0 - self.high) * n))
        k_low = max(1, math.ceil(self.low * n))
        high = ops.top_k(flat, k_high, sorted=True)[0][:, -1]
        low = -ops.top_k(-flat, k_low, sorted=True)[0][:, -1]
        low = ops.reshape(low, (-1, 1, 1, 1))
        high = ops.reshape(high, (-1, 1, 1, 1))
        scale = 255.0 / ops.maximum(high - low, 1.0)  # a flat image stays flat, not NaN
        return ops.clip((x - low) * scale, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high, "pool": self.pool}


def backbone_spec(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None


def resolve_weights(weights: str) -> str | None:
    """'imagenet' (the normal Keras download/cache), a local weights file, or 'none'."""
    if weights.lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file (use imagenet, none or a path)")
    return str(path)


def build_model(
    backbone: str,
    input_size: int,
    n_labels: int,
    weights: str = "imagenet",
    dropout: float = 0.3,
    intensity_stretch: bool = False,
) -> keras.Model:
    spec = backbone_spec(backbone)
    shape = (input_size, input_size, 3)
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=resolve_weights(weights), input_shape=shape
    )
    base.trainable = False

    image = keras.Input(shape=shape, dtype="uint8", name="image")
    x = PercentileStretch(name="intensity_stretch")(image) if intensity_stretch else image
    x = keras.layers.Rescaling(spec.scale, offset=spec.offset, name="backbone_scaling")(x)
    # training=False keeps BatchNorm in inference mode, also while the top is fine-tuned.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    probabilities = keras.layers.Dense(n_labels, activation="softmax", name="probabilities")(x)
    return keras.Model(image, probabilities, name=f"pneumonia_{spec.name}")


def load_trained(path: Path) -> keras.Model:
    """A run's model.keras; through this module, so its custom layers are registered."""
    return keras.models.load_model(path)


def backbone_of(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top `n_layers` of the backbone trainable, BatchNorm excepted; returns count."""
    base = backbone_of(model)
    base.trainable = True
    unfrozen = 0
    for i, layer in enumerate(base.layers):
        top = i >= len(base.layers) - n_layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
        unfrozen += int(layer.trainable and bool(layer.weights))
    return unfrozen
