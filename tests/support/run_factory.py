"""A run folder as `pneumoscreen train` writes it, around an untrained classifier.

For the export tests and the explain benchmark: the real model of training/model.py
(ImageNet weights when given, else random), a real patient-level split of a data folder
and training's own report, without any fitting (seconds, not minutes).
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE_DATA = Path(__file__).parents[1] / "fixtures" / "chest_xray"
SHARED_MOBILENET_WEIGHTS = (
    Path(__file__).parents[2].parent / "shared" / "weights" / "mobilenet_1_0_224_tf_no_top.h5"
)


def mobilenet_weights() -> str:
    """The ImageNet MobileNet weights of ../shared when present (CI), else "none"."""
    return str(SHARED_MOBILENET_WEIGHTS) if SHARED_MOBILENET_WEIGHTS.is_file() else "none"


def tiny_train_args(data: Path, out: Path, cache: Path, **options: object) -> list[str]:
    """`pneumoscreen train` arguments for a run small enough for a test: random weights,
    32 px, one epoch frozen and one fine-tuning, batches of 8. `options` override those or
    add flags (`epochs_finetune=0` -> `--epochs-finetune 0`)."""
    flags: dict[str, object] = {
        "weights": "none",
        "input_size": 32,
        "epochs_frozen": 1,
        "epochs_finetune": 1,
        "batch_size": 8,
        **options,
    }
    args = ["train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache)]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def make_untrained_run(
    run_dir: Path,
    data: Path,
    size: int,
    cache: Path | None,
    weights: str = "none",
    backbone: str = "mobilenet",
) -> Path:
    import keras

    from training.config import TrainConfig
    from training.data import label_counts, list_split, split_by_patient
    from training.evaluate import evaluate_run
    from training.model import build_model
    from training.run_record import DataCounts, RunRecord, tool_versions, write_run

    run_dir.mkdir(parents=True)
    keras.utils.set_random_seed(3)
    model = build_model(backbone, size, 2, weights=weights)
    model.save(run_dir / "model.keras")
    train, val = split_by_patient(list_split(data, "train"), 0.25, seed=1)
    (run_dir / "split.json").write_text(
        json.dumps(
            {
                "seed": 1,
                "val_fraction": 0.25,
                "train": [str(s.path.relative_to(data)) for s in train],
                "validation": [str(s.path.relative_to(data)) for s in val],
            }
        )
    )
    config = TrainConfig(
        data=data,
        out=run_dir,
        backbone=backbone,
        weights=weights,
        input_size=size,
        epochs_frozen=0,
        epochs_finetune=0,
        val_fraction=0.25,
        seed=1,
        cache_dir=cache,
    )
    write_run(
        run_dir,
        RunRecord(
            config=config,
            backbone=backbone,
            input_size=size,
            labels=["NORMAL", "PNEUMONIA"],
            positive_label="PNEUMONIA",
            positive_labels=["PNEUMONIA"],
            negative_label="NORMAL",
            threshold=0.5,
            target_sensitivity=0.95,
            data=DataCounts(
                root=str(data),
                train_images=len(train),
                validation_images=len(val),
                train_patients=len({s.patient for s in train}),
                validation_patients=len({s.patient for s in val}),
                train_counts=label_counts(train),
                validation_counts=label_counts(val),
            ),
            epochs_run=0,
            wall_time_s=0.0,
            tool_versions=tool_versions(),
        ),
    )
    evaluate_run(run_dir, data, batch_size=16, cache_dir=cache, model=model)
    return run_dir
