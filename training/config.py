"""`TrainConfig`: everything `pneumoscreen train` is asked, recorded verbatim in run.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.data import DEFAULT_CACHE_DIR


@dataclass
class TrainConfig:
    data: Path
    out: Path
    backbone: str = "mobilenet"
    weights: str = "imagenet"
    input_size: int = 224
    n_labels: int = 2
    epochs_frozen: int = 3
    epochs_finetune: int = 10
    fine_tune_layers: int | None = None  # None: the backbone's default
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    dropout: float = 0.3
    patience: int = 3
    val_fraction: float = 0.15
    # patient: random patients; acquisition: the most recent ids (training.data); kfold: fold i.
    validation: str = "patient"
    folds: int = 5
    fold: int = 0
    target_sensitivity: float = 0.95
    augment: bool = True
    # Recipe options of issue 13 (off by default: the shipped recipe is the baseline).
    strong_augment: bool = False  # + gamma, wider contrast/exposure, blur, noise, crop-zoom
    label_smoothing: float = 0.0
    cosine_decay: bool = False  # phase 2: one warm-up epoch, then cosine decay to 0
    intensity_stretch: bool = False  # training.model.PercentileStretch in the graph
    seed: int = 42
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    verbose: int = 2
    distribute: str = "none"  # training.distribute.DISTRIBUTE_CHOICES
