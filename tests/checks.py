"""Assertion helpers shared by the bijector and model tests (TFP's own are not in its wheel)."""

import numpy as np
import tensorflow as tf


def brute_force_inverse_log_det(bijector, y, event_ndims):
    """log|det d inverse(y) / dy| per event, from the full Jacobian (float64, small events).

    `tf.identity` defeats TFP's cache: a cached result would not be on this tape.
    """
    y = tf.convert_to_tensor(y)
    batch_shape = y.shape[: y.shape.rank - event_ndims]
    event_shape = y.shape[y.shape.rank - event_ndims :]
    flat = tf.reshape(y, [-1, event_shape.num_elements()])
    with tf.GradientTape() as tape:
        tape.watch(flat)
        x = bijector.inverse(tf.identity(tf.reshape(flat, [-1, *event_shape])))
        x = tf.reshape(x, [tf.shape(flat)[0], -1])
    jacobian = tape.batch_jacobian(x, flat).numpy()
    return np.linalg.slogdet(jacobian)[1].reshape(batch_shape)


def assert_round_trip(bijector, y, *, atol):
    """forward(inverse(y)) == y and inverse(forward(z)) == z, with the cache defeated."""
    z = bijector.inverse(tf.identity(y))
    np.testing.assert_allclose(bijector.forward(tf.identity(z)), y, atol=atol)
    x = bijector.forward(tf.identity(y))
    np.testing.assert_allclose(bijector.inverse(tf.identity(x)), y, atol=atol)


def assert_finite(*tensors):
    for t in tensors:
        assert np.all(np.isfinite(np.asarray(t))), t
