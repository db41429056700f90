"""Fine-tune an ImageNet CNN on a chest X-ray folder; pick the operating threshold.

Reads top to bottom, as `train(config)` runs, one function a step:

1. `split_data`: list the images, carve a validation split out of train BY PATIENT
   (random patients, acquisition order or k-fold; stratified, seeded): split.json.
2. `load_data`: preprocess every image with the service's own pipeline, cached on disk.
3. `build`: the strategy (training.distribute) and the model in its scope.
4. `fit_phase_1`: train the head on a frozen backbone. `fit_phase_2`: unfreeze the top
   blocks at a low learning rate. Class weights for the imbalance, augmentation that
   respects anatomy (no flips: the heart is on the left), best checkpoint and early stop on
   validation AUC (`ValidationAUC`).
5. `choose_operating_point`: the threshold on the validation split for the target
   sensitivity.
6. `run_record` -> run.json (training.run_record), then evaluate (training.evaluate): the
   report next to the model, and the calibration added to run.json.

Everything a later step needs is in the run folder:
    model.keras  run.json  split.json  history.csv  report/{metrics.json,roc.png,...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from training.config import TrainConfig  # also imported from here: training.train.TrainConfig
from training.data import (
    NEGATIVE_LABEL,
    POSITIVE_LABEL,
    Sample,
    class_weights,
    label_counts,
    labels_for,
    list_split,
    load_arrays,
    split_for_validation,
)
from training.distribute import describe, make_strategy
from training.evaluate import KnownProbabilities, evaluate_model
from training.metrics import binary_metrics, choose_threshold, positive_scores
from training.model import backbone_spec, build_model, load_trained, unfreeze_top
from training.run_record import DataCounts, RunRecord, tool_versions, write_run

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"


def train(config: TrainConfig) -> dict:
    """Train, choose the threshold, write run.json and the report; returns the report."""
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    labels = labels_for(config.n_labels)
    positive = [labels.index(label) for label in labels if label != NEGATIVE_LABEL]

    train_samples, val_samples = split_data(config)
    data = load_data(config, labels, train_samples, val_samples)
    strategy, model = build(config, labels)
    auc = ValidationAUC(data.x_val, data.y_val, positive, config.batch_size)
    checkpoint = keras.callbacks.ModelCheckpoint(
        config.out / MODEL_FILE, monitor="val_auc", mode="max", save_best_only=True, verbose=1
    )
    history_log = keras.callbacks.CSVLogger(str(config.out / HISTORY_FILE), append=True)
    fitting = Fitting(
        model, strategy, data, class_weights(train_samples, labels), auc, checkpoint, history_log
    )
    history = fit_phase_1(fitting, config)
    history += fit_phase_2(fitting, config, initial_epoch=len(history))
    best, threshold, val_probabilities = choose_operating_point(config, data, positive)

    record = run_record(
        config,
        labels,
        threshold,
        train_samples,
        val_samples,
        describe(strategy, model),
        history,
        auc.best,
        started,
    )
    # Written before evaluating, so a run whose evaluation fails still has its model and
    # record (`pneumoscreen evaluate` can finish it); written again with what evaluation
    # adds (the calibration) and the final wall time.
    write_run(config.out, record)
    record, report = evaluate_model(
        config.out,
        record,
        config.data,
        best,
        batch_size=config.batch_size,
        cache_dir=config.cache_dir,
        # The validation split was just predicted by the same model: not a second time.
        known={"validation": KnownProbabilities([s.path for s in val_samples], val_probabilities)},
    )
    record = record.model_copy(update={"wall_time_s": round(time.perf_counter() - started, 1)})
    write_run(config.out, record)
    print(f"done in {record.wall_time_s:.0f} s: {config.out}")
    return report


class ValidationAUC(keras.callbacks.Callback):
    """AUC of P(pneumonia) on the validation split, logged as `val_auc` each epoch."""

    def __init__(
        self, x_val: np.ndarray, y_val: np.ndarray, positive_indices: list[int], batch_size: int
    ) -> None:
        super().__init__()
        self.x_val, self.batch_size = x_val, batch_size
        self.positive_indices = positive_indices
        self.y_positive = np.isin(y_val, positive_indices)
        self.best = float("-inf")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        probabilities = self.model.predict(self.x_val, batch_size=self.batch_size, verbose=0)
        scores = positive_scores(probabilities, self.positive_indices)
        value = float(roc_auc_score(self.y_positive, scores))
        self.best = max(self.best, value)
        if logs is not None:
            logs["val_auc"] = value
        print(f" - val_auc: {value:.4f}")


# 1. Data, split by patient (random, by acquisition order or k-fold). The official val
#    folder is only reported, never used.
def split_data(config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples of the data folder's train/, recorded in split.json."""
    all_train = list_split(config.data, "train", config.n_labels)
    if not all_train:
        raise FileNotFoundError(f"no images in {config.data}/train/{{NORMAL,PNEUMONIA}}")
    train_samples, val_samples = split_for_validation(
        all_train, config.validation, config.val_fraction, config.seed, config.folds, config.fold
    )
    _write_split(config, train_samples, val_samples)
    print(
        f"train: {len(train_samples)} images {label_counts(train_samples)}, "
        f"validation ({config.validation}): {len(val_samples)} images "
        f"{label_counts(val_samples)}"
    )
    return train_samples, val_samples


# 2. The service's preprocessing, once, cached.
@dataclass(frozen=True)
class TrainingData:
    x_val: np.ndarray  # uint8 images of the validation split
    y_val: np.ndarray  # their label indices
    train_ds: tf.data.Dataset  # shuffled, augmented batches of the train split
    val_ds: tf.data.Dataset


def load_data(
    config: TrainConfig,
    labels: tuple[str, ...],
    train_samples: list[Sample],
    val_samples: list[Sample],
) -> TrainingData:
    size = (config.input_size, config.input_size)
    x_train, y_train = load_arrays(train_samples, labels, size, config.cache_dir)
    x_val, y_val = load_arrays(val_samples, labels, size, config.cache_dir)
    train_ds = _train_dataset(x_train, y_train, config)
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, _targets(y_val, labels, config))).batch(
        config.batch_size
    )
    return TrainingData(x_val, y_val, train_ds, val_ds)


# 3. The model, created in the strategy's scope (and so is each compile's optimizer).
def build(
    config: TrainConfig, labels: tuple[str, ...]
) -> tuple[tf.distribute.Strategy, keras.Model]:
    strategy = make_strategy(tf, config.distribute)
    print(
        f"distribute: {config.distribute} ({type(strategy).__name__}, "
        f"{strategy.num_replicas_in_sync} replica(s))"
    )
    with strategy.scope():
        model = build_model(
            config.backbone,
            config.input_size,
            len(labels),
            config.weights,
            config.dropout,
            config.intensity_stretch,
        )
    return strategy, model


# 4. Two-phase fine-tuning, best checkpoint on validation AUC.
@dataclass(frozen=True)
class Fitting:
    """What both phases share: one model, and callbacks that span them (the best AUC and
    checkpoint of phase 1 count in phase 2; one history.csv)."""

    model: keras.Model
    strategy: tf.distribute.Strategy
    data: TrainingData
    class_weight: dict[int, float]
    auc: ValidationAUC
    checkpoint: keras.callbacks.ModelCheckpoint
    history_log: keras.callbacks.CSVLogger


def fit_phase_1(fitting: Fitting, config: TrainConfig) -> list[dict[str, float]]:
    print(f"phase 1: frozen {config.backbone} backbone, head only")
    return fit_phase(fitting, config, config.learning_rate, config.epochs_frozen, 0)


def fit_phase_2(
    fitting: Fitting, config: TrainConfig, initial_epoch: int
) -> list[dict[str, float]]:
    n_layers = config.fine_tune_layers
    if n_layers is None:
        n_layers = backbone_spec(config.backbone).fine_tune_layers
    unfrozen = unfreeze_top(fitting.model, n_layers)
    print(f"phase 2: fine-tuning the top {n_layers} backbone layers ({unfrozen} with weights)")
    return fit_phase(
        fitting,
        config,
        config.fine_tune_learning_rate,
        config.epochs_finetune,
        initial_epoch,
        config.cosine_decay,
    )


def fit_phase(
    fitting: Fitting,
    config: TrainConfig,
    learning_rate: float,
    epochs: int,
    initial_epoch: int,
    cosine: bool = False,
) -> list[dict[str, float]]:
    """Compile (in the strategy's scope) and fit `epochs` more epochs with early stopping;
    the history rows as Keras logs them."""
    if epochs <= 0:
        return []
    model, data = fitting.model, fitting.data
    with fitting.strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(
                _learning_rate(learning_rate, epochs, len(data.train_ds), cosine)
            ),
            loss=_loss(config),
            metrics=["accuracy"],
        )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, verbose=1
    )
    result = model.fit(
        data.train_ds,
        validation_data=data.val_ds,
        epochs=initial_epoch + epochs,
        initial_epoch=initial_epoch,
        class_weight=fitting.class_weight,
        # auc first: the others read the val_auc it logs.
        callbacks=[fitting.auc, fitting.checkpoint, stop, fitting.history_log],
        verbose=config.verbose,
    )
    rows = [
        dict(zip(result.history, values, strict=True))
        for values in zip(*result.history.values(), strict=False)
    ]  # as Keras logs them
    return [{k: float(v) for k, v in row.items()} for row in rows]


# 5. The operating point, on the validation split.
def choose_operating_point(
    config: TrainConfig, data: TrainingData, positive: list[int]
) -> tuple[keras.Model, float, np.ndarray]:
    """The best checkpoint, the highest threshold reaching the target sensitivity, and the
    checkpoint's outputs for the validation split it was chosen on."""
    best = load_trained(config.out / MODEL_FILE)
    val_probabilities = best.predict(data.x_val, batch_size=config.batch_size, verbose=0)
    val_scores = positive_scores(val_probabilities, positive)
    y_val_positive = np.isin(data.y_val, positive)
    threshold = choose_threshold(y_val_positive, val_scores, config.target_sensitivity)
    val_metrics = binary_metrics(y_val_positive, val_scores, threshold)
    print(
        f"threshold {threshold:.4f} for sensitivity >= {config.target_sensitivity}: "
        f"validation AUC {val_metrics['auc']:.4f}, sensitivity "
        f"{val_metrics['sensitivity']:.3f}, specificity {val_metrics['specificity']:.3f}"
    )
    return best, threshold, val_probabilities


# 6. What the run found, for evaluate, export and the model card.
def run_record(
    config: TrainConfig,
    labels: tuple[str, ...],
    threshold: float,
    train_samples: list[Sample],
    val_samples: list[Sample],
    distribute: dict[str, Any],
    history: list[dict[str, float]],
    best_val_auc: float,
    started: float,
) -> RunRecord:
    return RunRecord(
        config=config,
        backbone=config.backbone,
        input_size=config.input_size,
        labels=list(labels),
        positive_label=POSITIVE_LABEL,
        positive_labels=[label for label in labels if label != NEGATIVE_LABEL],
        negative_label=NEGATIVE_LABEL,
        threshold=threshold,
        target_sensitivity=config.target_sensitivity,
        validation=config.validation,
        data=DataCounts(
            root=str(config.data),
            train_images=len(train_samples),
            validation_images=len(val_samples),
            train_patients=len({s.patient for s in train_samples}),
            validation_patients=len({s.patient for s in val_samples}),
            train_counts=label_counts(train_samples),
            validation_counts=label_counts(val_samples),
        ),
        distribute=distribute,
        epochs_run=len(history),
        best_val_auc=best_val_auc,
        history=history,
        wall_time_s=round(time.perf_counter() - started, 1),
        tool_versions=tool_versions(),
    )


# The steps' parts.
def _targets(y: np.ndarray, labels: tuple[str, ...], config: TrainConfig) -> np.ndarray:
    """Label indices, or one-hot rows when label smoothing needs them."""
    if config.label_smoothing > 0:
        return np.eye(len(labels), dtype=np.float32)[y]
    return y


def _loss(config: TrainConfig) -> keras.losses.Loss:
    if config.label_smoothing > 0:
        return keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def _learning_rate(
    peak: float, epochs: int, steps_per_epoch: int, cosine: bool
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """A constant rate, or one warm-up epoch to `peak` followed by cosine decay to 0."""
    if not cosine:
        return peak
    warmup = steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, (epochs - 1) * steps_per_epoch),
        warmup_target=peak,
        warmup_steps=warmup,
    )


def _train_dataset(x: np.ndarray, y: np.ndarray, config: TrainConfig) -> tf.data.Dataset:
    """Shuffled, augmented batches of uint8 images (the model scales them itself)."""
    labels = labels_for(config.n_labels)
    dataset = tf.data.Dataset.from_tensor_slices((x, _targets(y, labels, config)))
    dataset = dataset.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(config.batch_size)
    if config.augment:
        augmenter = augmentation(config.seed)
        strong = strong_augmentation(config.seed) if config.strong_augment else None

        def augment(images, labels):
            images = augmenter(tf.cast(images, "float32"), training=True)
            if strong is not None:
                images = strong(images)
            return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8), labels

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def augmentation(seed: int) -> keras.Sequential:
    """Small geometric and exposure changes a radiograph really shows; never a flip."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomRotation(0.02, fill_mode="constant", seed=seed),  # about +-7 degrees
            layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed + 1),
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 2),
            layers.RandomShear(x_factor=0.05, y_factor=0.05, fill_mode="constant", seed=seed + 3),
            layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 4),
            layers.RandomContrast(0.3, value_range=(0, 255), seed=seed + 5),
        ],
        name="augmentation",
    )


def strong_augmentation(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Issue 13's recipe, on top of `augmentation`: decouple contrast and exposure from the
    label (the 1st-99th percentile spread alone separates the classes with AUC 0.84 on train,
    partly an acquisition cue), plus crop-zoom, blur and sensor noise. Never a flip.

    Works on float batches in [0, 255]; each image draws its own parameters.
    """
    layers = keras.layers
    geometric = keras.Sequential(
        [
            # Zoom-in by up to 20% on each axis independently: a random resized crop.
            layers.RandomZoom((-0.2, 0.0), (-0.2, 0.0), fill_mode="reflect", seed=seed + 10),
            layers.RandomContrast(0.5, value_range=(0, 255), seed=seed + 11),
            layers.RandomGaussianBlur(
                factor=0.5, kernel_size=3, sigma=(0.1, 1.2), value_range=(0, 255), seed=seed + 12
            ),
        ],
        name="strong_augmentation",
    )
    generator = tf.random.Generator.from_seed(seed + 13)

    def apply(images):
        images = geometric(images, training=True)
        n = tf.shape(images)[0]
        # Gamma in [0.6, 1.6] per image: the exposure curve of another machine.
        gamma = tf.exp(generator.uniform([n, 1, 1, 1], np.log(0.6), np.log(1.6)))
        images = 255.0 * tf.pow(tf.clip_by_value(images, 0.0, 255.0) / 255.0, gamma)
        # Sensor noise on half the images, sigma up to 6 grey levels, the same on all 3 channels.
        sigma = generator.uniform([n, 1, 1, 1], 0.0, 6.0)
        sigma *= tf.cast(generator.uniform([n, 1, 1, 1]) < 0.5, tf.float32)
        noise = generator.normal(tf.concat([tf.shape(images)[:3], [1]], 0)) * sigma
        return images + noise

    return apply


def _write_split(config: TrainConfig, train: list[Sample], val: list[Sample]) -> None:
    def rel(samples: list[Sample]) -> list[str]:
        return [str(s.path.relative_to(config.data)) for s in samples]

    split = {
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "scheme": config.validation,
        "train": rel(train),
        "validation": rel(val),
    }
    (config.out / "split.json").write_text(json.dumps(split, indent=1) + "\n")
