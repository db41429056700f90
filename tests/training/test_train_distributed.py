"""`pneumoscreen train --distribute mirrored` on the CPU: tf.distribute.MirroredStrategy
with its one replica, on the committed fixture X-rays, small enough for CI (the cluster
Job of deploy/k8s/training runs the same option across GPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscreen.cli import app
from tests.support.run_factory import tiny_train_args

FIXTURES = Path(__file__).parents[1] / "fixtures"
DATA = FIXTURES / "chest_xray"
SIZE = 64


@pytest.mark.slow
def test_mirrored_strategy_trains_one_replica_on_cpu(tmp_path: Path) -> None:
    from training.model import load_trained
    from training.run_record import read_run

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        tiny_train_args(
            DATA,
            run_dir,
            tmp_path / "cache",
            input_size=SIZE,
            val_fraction=0.25,
            distribute="mirrored",
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = read_run(run_dir)
    assert run.config.distribute == "mirrored"
    distribute = run.distribute
    assert distribute is not None
    # The model itself was built in the strategy's scope, not only the strategy made.
    assert distribute.strategy == distribute.model_strategy == "MirroredStrategy"
    assert distribute.replicas == 1 and len(distribute.devices) == 1
    assert "CPU" in distribute.devices[0].upper()
    assert run.epochs_run == 2  # both phases ran: phase 2 recompiled in the scope

    model = load_trained(run_dir / "model.keras")
    images = np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_run_record_of_the_default_strategy() -> None:
    """`--distribute none` (the default): TensorFlow's default strategy, which keeps no
    device list; run.json still records it."""
    import keras
    import tensorflow as tf

    from training.distribute import describe, make_strategy

    strategy = make_strategy(tf, "none")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    record = describe(strategy, model)
    assert record["replicas"] == 1 and record["devices"] == []
    assert record["strategy"] == record["model_strategy"] == "_DefaultDistributionStrategy"
    json.dumps(record)


def test_unknown_distribute_strategy_is_refused_before_tensorflow_loads(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(DATA),
            "--out",
            str(tmp_path / "run"),
            "--distribute",
            "tpu",
        ],
    )
    assert result.exit_code == 2
    assert "--distribute" in result.output and "mirrored" in result.output
    assert not (tmp_path / "run").exists()
