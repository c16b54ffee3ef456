"""`tf.distribute` strategies for `train_tf.py`, and the loop for multi-worker training.

    default      the default strategy (one device; a GPU if TensorFlow sees one)
    mirrored     tf.distribute.MirroredStrategy: all local GPUs, or `cpu_devices` logical CPUs;
                 trained with Keras `fit`
    multiworker  tf.distribute.MultiWorkerMirroredStrategy from the TF_CONFIG environment
                 variable; trained with `fit_custom_loop`, because Keras 3 `fit` fails under it
                 (keras-team/keras#20585)
    tpu          tf.distribute.TPUStrategy on the TPU named by the TPU_NAME environment variable
                 (or a local TPU VM); by the book, not testable without a TPU

`fit_custom_loop` runs the model's own `train_step` (the same loss, optimizer, non-finite guard
and power iterations as `fit`) inside `strategy.run`, and calls the given Keras callbacks'
epoch hooks, so evaluation and files are the same as with `fit`.
"""

import json
import os
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from tfp_resflow.core import validation

__all__ = ["STRATEGIES", "fit_custom_loop", "is_chief", "make_strategy", "task_index"]

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


def make_strategy(name: str, *, cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Creates the named strategy. Must run before TensorFlow executes any op.

    Args:
        name: "default", "mirrored", "multiworker" or "tpu".
        cpu_devices: if > 0, split the first CPU into this many logical devices first, and let
            "mirrored" use them (when no GPU is visible).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: for an unknown name or a multi-worker run without TF_CONFIG.
    """
    validation.choice("strategy", name, STRATEGIES)
    if cpu_devices > 0:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)]
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = None
        if not tf.config.list_physical_devices("GPU") and cpu_devices > 0:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multiworker' needs the TF_CONFIG environment variable.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def task_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster (0 otherwise)."""
    del strategy
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    return int(config.get("task", {}).get("index", 0))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (worker 0, or any single-worker run)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return task.get("type", "worker") in ("chief", "worker") and task_index(strategy) == 0


def fit_custom_loop(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    epochs: int,
    steps_per_epoch: int,
    initial_epoch: int = 0,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int = 2,
) -> dict[str, list[float]]:
    """Trains `model` (compiled, built) with `model.train_step` inside `strategy.run`.

    The dataset yields global batches; it is split across the replicas of every worker
    (sharded by data, since generated datasets have no files to shard by).

    Returns:
        `{"loss": [mean training loss of each epoch]}`, like `History.history`.
    """
    iterator = iter(strategy.experimental_distribute_dataset(_sharded_by_data(dataset)))
    train_step = _distributed_train_step(strategy, model)
    callbacks = list(callbacks or [])
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    history: dict[str, list[float]] = {"loss": []}
    for epoch in range(initial_epoch, epochs):
        start = time.perf_counter()
        for metric in model.metrics:
            metric.reset_state()
        for _ in range(steps_per_epoch):
            loss = train_step(next(iterator))
        logs = {"loss": float(loss)}
        history["loss"].append(logs["loss"])
        if verbose:
            print(
                f"epoch {epoch + 1}/{epochs} - {time.perf_counter() - start:.1f}s - "
                f"loss: {logs['loss']:.4f}"
            )
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
    for callback in callbacks:
        callback.on_train_end()
    model.optimizer.finalize_variable_values(model.trainable_weights)  # EMA, as fit does
    return history


def _sharded_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset`, sharded by data across workers (generated datasets have no files)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _distributed_train_step(
    strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable[[tf.Tensor], tf.Tensor]:
    """A traced step running `model.train_step` on every replica; returns the loss."""

    @tf.function
    def train_step(batch: tf.Tensor) -> tf.Tensor:
        logs = strategy.run(model.train_step, args=(batch,))
        # The loss tracker is a Keras Mean metric: every replica reports the same result.
        return strategy.experimental_local_results(logs["loss"])[0]

    return train_step
