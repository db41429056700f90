"""Several trained runs as one model: one graph, one bundle, the service unchanged.

    image -> shared preprocessing layers -> ensemble backbone (every member's backbone,
        feature maps concatenated along channels) -> pool -> Dense(n_labels, softmax)

The head holds every member's Dense layer side by side, each weighted 1/M, so

    logits = sum_m (mean_hw F_m) . W_m / M + mean_m B_m = mean of the members' logits

and the model keeps the shape training/model.py gives a single run: a linear head after
global average pooling. So the exact CAM of export.explain_graph (now the mean of the
members' CAMs), the gate on the pooled features (the members' features side by side) and
temperature folding all apply to the ensemble as they are.

Members must share the validation split (the threshold and temperature are chosen on it
and would be contaminated by a member that trained on it), the input size and the
preprocessing layers before the backbone.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.data import load_arrays, split_samples
from training.metrics import binary_metrics, choose_threshold, positive_scores
from training.run_record import EnsembleInfo, read_run, write_run

POOL, DENSE = "pool", "probabilities"


def _front_layers(model) -> list:
    """The layers between the input and the backbone (scaling, intensity stretch)."""
    import keras

    from training.model import backbone_of

    base = backbone_of(model)
    front = []
    for layer in model.layers:
        if layer is base:
            return front
        if not isinstance(layer, keras.layers.InputLayer):
            front.append(layer)
    raise ValueError(f"{model.name}: no backbone found")


def _front_signature(model) -> list[dict]:
    return [{"class": type(layer).__name__, **layer.get_config()} for layer in _front_layers(model)]


def build_ensemble(members: list) -> object:
    """One keras.Model whose logits are the mean of the members' logits (module docstring)."""
    import keras

    from training.model import backbone_of

    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    shape = members[0].input_shape[1:]
    signature = _front_signature(members[0])
    for member in members[1:]:
        if member.input_shape[1:] != shape:
            raise ValueError(f"members take different inputs: {shape} and {member.input_shape[1:]}")
        if _front_signature(member) != signature:
            raise ValueError(
                "members preprocess differently before the backbone (e.g. one "
                "has --intensity-stretch): their inputs could not be shared"
            )

    # Each member's backbone, renamed (layer names must be unique within a model) and
    # holding its trained weights.
    backbones = []
    for i, member in enumerate(members):
        base = backbone_of(member)
        config = base.get_config()
        config["name"] = f"member{i}_{base.name}"
        copy = type(base).from_config(config)
        copy.set_weights(base.get_weights())
        backbones.append(copy)
    base_input = keras.Input(shape=backbones[0].input_shape[1:], name="backbone_input")
    maps = [b(base_input, training=False) for b in backbones]
    combined = keras.Model(
        base_input,
        keras.layers.Concatenate(axis=-1, name="members")(maps),
        name="ensemble_backbone",
    )

    image = keras.Input(shape=shape, dtype="uint8", name="image")
    x = image
    for layer in _front_layers(members[0]):
        copy = type(layer).from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())  # none today (scaling, stretch), but keep any
    x = combined(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=POOL)(x)
    n_labels = members[0].get_layer(DENSE).units
    dense = keras.layers.Dense(n_labels, activation="softmax", name=DENSE)
    probabilities = dense(x)
    kernels, biases = zip(*(m.get_layer(DENSE).get_weights() for m in members), strict=True)
    m = len(members)
    dense.set_weights([np.concatenate(kernels, axis=0) / m, np.mean(biases, axis=0)])
    return keras.Model(image, probabilities, name=f"ensemble_of_{m}")


def _same_split(run_dirs: list[Path]) -> dict:
    splits = [json.loads((d / "split.json").read_text()) for d in run_dirs]
    for run_dir, split in zip(run_dirs[1:], splits[1:], strict=True):
        if split["validation"] != splits[0]["validation"]:
            raise ValueError(
                f"{run_dir} was validated on other images than {run_dirs[0]}: "
                "members must share the validation split (the ensemble's "
                "threshold is chosen on it)"
            )
    return splits[0]


def ensemble_runs(
    run_dirs: list[Path],
    out: Path,
    data_root: Path,
    cache_dir: Path | None = None,
    batch_size: int = 32,
) -> dict:
    """Write `out` as a run folder (model.keras, split.json, run.json, report/) that
    `pneumoscreen export` turns into a bundle like any other run."""
    from training.evaluate import KnownProbabilities, evaluate_run
    from training.model import load_trained

    started = time.perf_counter()
    split = _same_split(run_dirs)
    runs = [read_run(d) for d in run_dirs]
    first = runs[0]
    for run_dir, run in zip(run_dirs, runs, strict=True):
        for key in ("labels", "positive_labels", "input_size", "target_sensitivity"):
            if getattr(run, key) != getattr(first, key):
                raise ValueError(
                    f"{run_dir}: {key} {getattr(run, key)!r} differs from "
                    f"{run_dirs[0]}'s {getattr(first, key)!r}"
                )
    model = build_ensemble([load_trained(d / "model.keras") for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    (out / "split.json").write_text(json.dumps(split, indent=1) + "\n")

    # The operating point by the members' own rule, on the shared validation split.
    labels = tuple(first.labels)
    samples = split_samples(out, data_root, "validation", len(labels))
    x_val, y_val = load_arrays(samples, labels, first.image_size, cache_dir)
    positive = first.positive_indices()
    probabilities = model.predict(x_val, batch_size=batch_size, verbose=0)
    scores = positive_scores(probabilities, positive)
    y_positive = np.isin(y_val, positive)
    threshold = choose_threshold(y_positive, scores, first.target_sensitivity)
    metrics = binary_metrics(y_positive, scores, threshold)
    print(
        f"ensemble of {len(run_dirs)}: validation AUC {metrics['auc']:.4f}, threshold "
        f"{threshold:.4f}, sensitivity {metrics['sensitivity']:.3f}, specificity "
        f"{metrics['specificity']:.3f}"
    )

    # The first member's record (its config, data counts and tool versions stand for the
    # recipe all members share), with the ensemble's own threshold and no calibration yet.
    record = first.model_copy(
        update={
            "config": replace(first.config, out=out),
            "threshold": threshold,
            "distribute": None,
            "calibration": None,
            "ensemble": EnsembleInfo(
                members=[str(d) for d in run_dirs],
                member_best_val_auc=[r.best_val_auc for r in runs],
                combination="mean of the members' logits (one Dense head over their "
                "concatenated pooled features, each member weighted 1/M)",
            ),
            "epochs_run": sum(r.epochs_run for r in runs),
            "best_val_auc": metrics["auc"],
            "history": [],
            # What this model took: every member's training, then this step.
            "wall_time_s": round(
                sum(r.wall_time_s for r in runs) + time.perf_counter() - started, 1
            ),
        }
    )
    write_run(out, record)
    # The validation split was just predicted by the same model: not a second time.
    known = {"validation": KnownProbabilities([s.path for s in samples], probabilities)}
    return evaluate_run(
        out, data_root, batch_size=batch_size, cache_dir=cache_dir, model=model, known=known
    )
