"""Evaluation of a trained flow: EMA weights, evaluation-mode losses and accuracy.

Keras validates with the raw weights, while the paper's numbers are for the EMA weights with
converged Lipschitz estimates; these functions compute them, and
`tfp_resflow.training.evaluation_callback.EvaluationCallback` runs them after every epoch of a
training run.

- `ema_weights`: a context that swaps the EMA weights (and their power-iteration vectors) in.
- `evaluation_losses`, `evaluate_loss`: per-example losses in evaluation mode, and their mean;
  `evaluation_outputs` gives them per batch with a classifier's hits.
- `weights_checksum`: a cheap fingerprint to compare two weight sets (resumed runs, workers).
"""

import contextlib
from collections.abc import Iterable, Iterator

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow.layers import lipschitz
from tfp_resflow.models.model import FlowModel

__all__ = [
    "class_contexts",
    "ema_weights",
    "evaluate_loss",
    "evaluation_accuracy",
    "evaluation_losses",
    "evaluation_outputs",
    "weights_checksum",
]


def weights_checksum(weights: list) -> list[float]:
    """Per-weight sums of absolute values: a cheap fingerprint to compare two weight sets."""
    return [float(np.abs(np.asarray(w, np.float64)).sum()) for w in weights]


@contextlib.contextmanager
def ema_weights(model: keras.Model, power_vectors: dict | None = None) -> Iterator[None]:
    """Temporarily replaces the trainable weights by their EMA (if the optimizer keeps one).

    The power-iteration vectors (u, v) of the Lipschitz layers belong to the kernels they were
    converged for, so they are swapped too: the training weights get theirs back on exit, and
    with a `power_vectors` dict the EMA weights' vectors are kept in it between calls, so the
    next evaluation starts its power iterations from the last ones (the EMA moves slowly).
    """
    optimizer = model.optimizer
    raw = [v.numpy() for v in model.trainable_weights]
    vectors = [w for layer in lipschitz.spectral_layers(model) for w in layer.non_trainable_weights]
    raw_vectors = [w.numpy() for w in vectors]
    if optimizer is not None and getattr(optimizer, "built", False):
        optimizer.finalize_variable_values(model.trainable_weights)
    if power_vectors and len(power_vectors.get("ema", [])) == len(vectors):
        for variable, value in zip(vectors, power_vectors["ema"], strict=True):
            variable.assign(value)
    try:
        yield
    finally:
        if power_vectors is not None:
            power_vectors["ema"] = [w.numpy() for w in vectors]
        for variable, value in zip(model.trainable_weights, raw, strict=True):
            variable.assign(value)
        for variable, value in zip(vectors, raw_vectors, strict=True):
            variable.assign(value)


def evaluation_losses(
    model: FlowModel, dataset: tf.data.Dataset | Iterable[tf.Tensor]
) -> list[np.ndarray]:
    """Per-example losses (`model.loss_unit`) in evaluation mode, one array per batch.

    Batches may be `(x, labels)`; a `HybridFlowModel`'s loss here is its likelihood's (`nll`).
    """
    return [losses for losses, _ in evaluation_outputs(model, dataset)]


def evaluation_accuracy(model: FlowModel, dataset: tf.data.Dataset) -> float:
    """Fraction of `(x, labels)` examples a `HybridFlowModel` classifies right (evaluation mode)."""
    correct = [hits for _, hits in evaluation_outputs(model, dataset, labelled=True)]
    return float(np.mean(np.concatenate(correct)))


def evaluation_outputs(
    model: FlowModel, dataset: Iterable, *, labelled: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Per batch: the per-example loss (evaluation mode) and, for labelled batches, the hits.

    Batches are `x`, `(x, labels)` or, for a conditional model, `(x, c)`; the hits (whether a
    `HybridFlowModel` classifies each example right) are None without labels.
    """
    step = getattr(model, "_evaluation_step", None)
    if step is None:

        def evaluate(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            out = model(x, training=False)
            if isinstance(out, dict):  # a HybridFlowModel: the likelihood and the classes
                return tf.cast(out["nll"], tf.float64), tf.argmax(out["logits"], axis=-1)
            return tf.cast(out, tf.float64), tf.zeros(tf.shape(out), tf.int64)

        step = model._evaluation_step = tf.function(evaluate)
    conditional = getattr(model, "context_shape", None) is not None
    for batch in dataset:
        if conditional:  # (x, c): the pair is the model's input; there are no labels
            x, labels = tuple(batch), None
        else:
            x, labels = batch if isinstance(batch, tuple) else (batch, None)
        losses, predicted = step(x)
        if labelled and labels is None:
            raise ValueError("accuracy needs (x, labels) batches.")
        hits = None if labels is None else predicted.numpy() == labels.numpy()
        yield losses.numpy(), hits


def class_contexts(num_classes: int, per_class: int) -> np.ndarray:
    """One-hot contexts `[num_classes * per_class, num_classes]`, class by class.

    Samples of a class-conditional model drawn with them tile as one row per class.
    """
    return np.repeat(np.eye(num_classes, dtype=np.float32), per_class, axis=0)


def evaluate_loss(model: FlowModel, dataset: tf.data.Dataset | Iterable[tf.Tensor]) -> float:
    """Mean per-example loss (`model.loss_unit`) in evaluation mode over finitely many batches."""
    losses = evaluation_losses(model, dataset)
    return float(np.mean(np.concatenate(losses))) if losses else 0.0
