"""Where training runs: one device, or every visible GPU through tf.distribute.

    pneumoscreen train ... --distribute mirrored

`mirrored` is tf.distribute.MirroredStrategy: one replica per visible GPU on one machine,
gradients summed across them each step; with no GPU it runs one replica on the CPU.
`--batch-size` stays the global batch, split evenly across the replicas, so the recipe's
learning rates keep their meaning. TensorFlow is passed in, never imported here, so the
CLI can validate the choice without loading it.
"""

from __future__ import annotations

from typing import Any

DISTRIBUTE_CHOICES = ("none", "mirrored")


def make_strategy(tf: Any, name: str) -> Any:
    """The tf.distribute strategy for `name` (one of DISTRIBUTE_CHOICES)."""
    if name == "none":
        return tf.distribute.get_strategy()  # TensorFlow's default: one device, no scope
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise ValueError(f"unknown distribute strategy {name!r}; choose from {DISTRIBUTE_CHOICES}")


def describe(strategy: Any, model: Any) -> dict[str, Any]:
    """What run.json records: the strategy asked for and the one the model was built under
    (Keras captures the strategy in scope when the model is created)."""
    try:
        devices = [str(device) for device in strategy.extended.worker_devices]
    except RuntimeError:  # the default strategy keeps no device list: TensorFlow places ops
        devices = []
    return {
        "strategy": type(strategy).__name__,
        "replicas": int(strategy.num_replicas_in_sync),
        "devices": devices,
        "model_strategy": type(model.distribute_strategy).__name__,
    }
