"""Tests of the per-epoch evaluation: EMA weights swapped in and back, evaluation losses."""

import numpy as np
import tensorflow as tf
from test_train_config import compiled_toy_model

from tfp_resflow.training import evaluation, train_config


def test_ema_weights_swap_in_and_back():
    model, x = compiled_toy_model(
        train_config.TrainConfig(warmup_steps=0, learning_rate=0.05, ema_momentum=0.9)
    )
    for _ in range(3):
        model.train_on_batch(x)
    raw = [w.numpy().copy() for w in model.trainable_weights]
    with evaluation.ema_weights(model):
        averaged = [w.numpy().copy() for w in model.trainable_weights]
    after = [w.numpy() for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(raw, averaged, strict=True))
    for a, b in zip(raw, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_loss_is_the_mean_over_examples():
    model, x = compiled_toy_model()
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(24)  # uneven last batch
    expected = float(tf.reduce_mean(model(x, training=False)))
    np.testing.assert_allclose(evaluation.evaluate_loss(model, dataset), expected, rtol=1e-5)
