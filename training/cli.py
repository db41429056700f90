"""`pneumoscreen train` and `pneumoscreen evaluate`. TensorFlow is imported only when run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.data import DEFAULT_CACHE_DIR
from training.distribute import DISTRIBUTE_CHOICES

CacheDirOption = Annotated[
    Path,
    typer.Option(
        help="Where preprocessed arrays are cached, shared by train, evaluate and "
        "export (default ~/.cache/pneumoscreen)."
    ),
]
DataOption = Annotated[
    Path,
    typer.Option(
        help="Data folder in the layout <root>/{train,val,test}/{NORMAL,PNEUMONIA}/.",
        exists=True,
        file_okay=False,
    ),
]


def train_command(
    data: DataOption,
    out: Annotated[
        Path, typer.Option(help="Run folder to write (model, report, run.json).")
    ] = Path("runs/mobilenet-224"),
    backbone: Annotated[str, typer.Option(help="mobilenet | xception | mobilenetv2")] = "mobilenet",
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet (the normal Keras download/cache), none, or a local weights file."
        ),
    ] = "imagenet",
    input_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 224,
    labels: Annotated[
        int, typer.Option(help="2: NORMAL/PNEUMONIA; 3: NORMAL/BACTERIAL/VIRAL (from filenames).")
    ] = 2,
    epochs_frozen: Annotated[int, typer.Option(help="Phase 1 epochs (frozen backbone).")] = 3,
    epochs_finetune: Annotated[int, typer.Option(help="Phase 2 epochs (top unfrozen).")] = 10,
    fine_tune_layers: Annotated[
        int | None,
        typer.Option(help="Backbone layers to unfreeze in phase 2 (default: the backbone's own)."),
    ] = None,
    batch_size: int = 32,
    learning_rate: Annotated[float, typer.Option(help="Phase 1 learning rate.")] = 1e-3,
    fine_tune_learning_rate: Annotated[float, typer.Option(help="Phase 2 learning rate.")] = 1e-4,
    patience: Annotated[
        int, typer.Option(help="Early stop after this many epochs without a better validation AUC.")
    ] = 3,
    val_fraction: Annotated[
        float, typer.Option(help="Share of train patients held out for validation.")
    ] = 0.15,
    target_sensitivity: Annotated[
        float,
        typer.Option(
            help="The threshold is the highest one reaching this sensitivity on validation."
        ),
    ] = 0.95,
    validation: Annotated[
        str,
        typer.Option(
            help="Validation split: patient (random patients), acquisition (the most recent "
            "ids of each series) or kfold (with --folds/--fold)."
        ),
    ] = "patient",
    folds: Annotated[int, typer.Option(help="k of --validation kfold.")] = 5,
    fold: Annotated[int, typer.Option(help="Which fold --validation kfold holds out.")] = 0,
    augment: Annotated[bool, typer.Option(help="Geometric and exposure augmentation.")] = True,
    strong_augment: Annotated[
        bool,
        typer.Option(help="Also gamma, wide contrast, blur, noise and crop-zoom (never flips)."),
    ] = False,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = 0.0,
    cosine_decay: Annotated[
        bool,
        typer.Option(help="Phase 2: one warm-up epoch, then cosine decay of the learning rate."),
    ] = False,
    intensity_stretch: Annotated[
        bool,
        typer.Option(
            help="Stretch each image's 1st-99th grey-level percentiles to 0-255 inside the "
            "model (so the exported ONNX graph does it too)."
        ),
    ] = False,
    seed: int = 42,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
    distribute: Annotated[
        str,
        typer.Option(
            help="none: one device; mirrored: tf.distribute.MirroredStrategy over every visible "
            "GPU (one replica on a CPU-only machine). --batch-size stays the global batch, "
            "split across the replicas."
        ),
    ] = "none",
) -> None:
    """Fine-tune an ImageNet CNN on a folder of X-rays, choose the threshold, write a report."""
    if distribute not in DISTRIBUTE_CHOICES:
        raise typer.BadParameter(
            f"{distribute!r} is not one of {', '.join(DISTRIBUTE_CHOICES)}",
            param_hint="--distribute",
        )
    from training.config import TrainConfig
    from training.train import train

    config = TrainConfig(
        data=data,
        out=out,
        backbone=backbone,
        weights=weights,
        input_size=input_size,
        n_labels=labels,
        epochs_frozen=epochs_frozen,
        epochs_finetune=epochs_finetune,
        fine_tune_layers=fine_tune_layers,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fine_tune_learning_rate=fine_tune_learning_rate,
        patience=patience,
        val_fraction=val_fraction,
        validation=validation,
        folds=folds,
        fold=fold,
        target_sensitivity=target_sensitivity,
        augment=augment,
        strong_augment=strong_augment,
        label_smoothing=label_smoothing,
        cosine_decay=cosine_decay,
        intensity_stretch=intensity_stretch,
        seed=seed,
        cache_dir=cache_dir,
        distribute=distribute,
    )
    train(config)


def evaluate_command(
    run: Annotated[
        Path, typer.Option(help="Run folder written by `train`.", exists=True, file_okay=False)
    ],
    data: DataOption,
    batch_size: int = 32,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
) -> None:
    """Report AUC, sensitivity, specificity, ... of a run at its threshold (report/)."""
    from training.evaluate import evaluate_run

    evaluate_run(run, data, batch_size=batch_size, cache_dir=cache_dir)


def crossval_command(
    run: Annotated[
        list[Path],
        typer.Option(
            help="A k-fold member's run folder (repeat for every fold).",
            exists=True,
            file_okay=False,
        ),
    ],
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Folder for crossval.json.")] = Path("runs/crossval"),
    batch_size: int = 32,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
) -> None:
    """Pool k-fold members' out-of-fold scores: per-fold and pooled figures, one threshold."""
    from training.crossval import crossval_report

    crossval_report(run, data, out, cache_dir=cache_dir, batch_size=batch_size)


def ensemble_command(
    run: Annotated[
        list[Path],
        typer.Option(
            help="A member's run folder (repeat; at least two, all validated on the same split).",
            exists=True,
            file_okay=False,
        ),
    ],
    data: DataOption,
    out: Annotated[
        Path,
        typer.Option(help="Run folder to write; `pneumoscreen export --run` makes it a bundle."),
    ],
    batch_size: int = 32,
    cache_dir: CacheDirOption = DEFAULT_CACHE_DIR,
) -> None:
    """Average several runs inside one model (mean of their logits), choose its threshold on
    their shared validation split and write an evaluated run folder."""
    from training.ensemble import ensemble_runs

    if len(run) < 2:
        raise typer.BadParameter("give at least two --run folders", param_hint="--run")
    ensemble_runs(run, out, data, cache_dir=cache_dir, batch_size=batch_size)
