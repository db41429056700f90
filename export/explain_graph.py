"""The trained classifier with two more outputs from the same forward pass.

    image -> scaling -> backbone -> feature map F [N, h, w, C]
        -> pool -> features [N, C]  -> Dense (softmax) -> probabilities [N, n_labels]
        F -> F . w + b           -> cam [N, h, w]

training/model.py keeps the head linear after global average pooling (dropout is the
identity at inference), so with logits z_k = mean_hw(F) . W_k + B_k:

    w = mean of W over the positive labels - mean of W over the others, b likewise
    mean_hw(cam) = mean positive logit - mean negative logit

For the two-label model this is z_PNEUMONIA - z_NORMAL = log P(PNEUMONIA)/P(NORMAL)
exactly: the CAM is the exact spatial decomposition of the model's log-odds (a softmax
over two labels is a sigmoid of that difference). For the three-label model
(BACTERIAL, VIRAL against NORMAL) it is the mean positive logit minus the NORMAL logit, a
linear map of the same evidence, not the log-odds of P(BACTERIAL) + P(VIRAL).
"""

from __future__ import annotations

import numpy as np

from service.bundle import CAM_NAME, FEATURES_NAME, INPUT_NAME, OUTPUT_NAME


def cam_direction(
    kernel: np.ndarray, bias: np.ndarray, positive: list[int]
) -> tuple[np.ndarray, float]:
    """The Dense layer's (C, n_labels) kernel and bias -> CAM weights (C,) and bias."""
    negative = [i for i in range(kernel.shape[1]) if i not in positive]
    weights = kernel[:, positive].mean(axis=1) - kernel[:, negative].mean(axis=1)
    offset = float(bias[positive].mean() - bias[negative].mean())
    return weights.astype(np.float32), offset


def explain_model(model, positive: list[int]):
    """A keras.Model with outputs {probabilities, features, cam}, sharing model's layers."""
    import keras

    from training.model import backbone_of

    base = backbone_of(model)
    pool = model.get_layer("pool")
    dense = model.get_layer(OUTPUT_NAME)
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        raise TypeError("the exact CAM needs global average pooling before the head")
    if getattr(dense.activation, "__name__", "") != "softmax":
        raise ValueError("the head must be a softmax Dense layer")

    image = keras.Input(shape=model.input_shape[1:], dtype="uint8", name=INPUT_NAME)
    x = image
    feature_map = features = probabilities = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer is base:
            x = feature_map = base(x, training=False)
        elif layer is pool:
            x = features = pool(x)
        elif isinstance(layer, keras.layers.Dropout):
            continue  # the identity at inference
        elif layer is dense:
            probabilities = dense(x)
        elif features is None:
            x = layer(x)
        else:
            raise ValueError(
                f"unexpected layer {layer.name} after pooling: the head must "
                "stay linear for an exact CAM"
            )
    if feature_map is None or features is None or probabilities is None:
        raise ValueError("the model is not backbone -> pool -> (dropout) -> Dense")

    kernel, bias = dense.get_weights()
    weights, offset = cam_direction(kernel, bias, positive)
    projection = keras.layers.Dense(1, name="cam_projection")
    cam = keras.layers.Reshape(tuple(feature_map.shape[1:3]), name=CAM_NAME)(
        projection(feature_map)
    )
    projection.set_weights([weights[:, None], np.array([offset], dtype=np.float32)])
    named_features = keras.layers.Identity(name=FEATURES_NAME)(features)
    return keras.Model(
        image,
        {OUTPUT_NAME: probabilities, FEATURES_NAME: named_features, CAM_NAME: cam},
        name=f"{model.name}_explain",
    )


def feature_maps(model, images: np.ndarray) -> np.ndarray:
    """The backbone's last feature maps (N, h, w, C) of the trained model, through Keras
    (for tests: the CAM recomputed in numpy from these must equal the ONNX `cam`)."""
    import keras

    from training.model import backbone_of

    base = backbone_of(model)
    scaling = model.get_layer("backbone_scaling")
    image = keras.Input(shape=model.input_shape[1:], dtype="uint8")
    probe = keras.Model(image, base(scaling(image), training=False))
    return np.asarray(probe.predict(images, verbose=0))
