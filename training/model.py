"""The classifier: ImageNet backbone + linear head, taking uint8 pixels.

    image uint8 (H, W, 3) -> the backbone's own input scaling -> backbone
        -> GlobalAveragePooling -> Dropout -> Dense(n_labels, softmax) "probabilities"

The scaling lives inside the model, so the exported ONNX graph takes the service's uint8
arrays as they are. The head stays linear after pooling, which keeps an exact class
activation map possible (weights of the Dense layer times the last feature maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras


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
) -> keras.Model:
    spec = backbone_spec(backbone)
    shape = (input_size, input_size, 3)
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=resolve_weights(weights), input_shape=shape
    )
    base.trainable = False

    image = keras.Input(shape=shape, dtype="uint8", name="image")
    x = keras.layers.Rescaling(spec.scale, offset=spec.offset, name="backbone_scaling")(image)
    # training=False keeps BatchNorm in inference mode, also while the top is fine-tuned.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    probabilities = keras.layers.Dense(n_labels, activation="softmax", name="probabilities")(x)
    return keras.Model(image, probabilities, name=f"pneumonia_{spec.name}")


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
