"""Assertion helpers shared by the bijector and model tests (TFP's own are not in its wheel)."""

import numpy as np
import tensorflow as tf


def brute_force_inverse_log_det(bijector, y, event_ndims, **kwargs):
    """log|det d inverse(y) / dy| per event, from the full Jacobian (float64, small events).

    `tf.identity` defeats TFP's cache: a cached result would not be on this tape. `kwargs` go
    to `inverse` (e.g. a conditional bijector's `conditional_input`, one per example).
    """
    y = tf.convert_to_tensor(y)
    batch_shape = y.shape[: y.shape.rank - event_ndims]
    event_shape = y.shape[y.shape.rank - event_ndims :]
    flat = tf.reshape(y, [-1, event_shape.num_elements()])
    with tf.GradientTape() as tape:
        tape.watch(flat)
        x = bijector.inverse(tf.identity(tf.reshape(flat, [-1, *event_shape])), **kwargs)
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


def brute_force_induced_norm_2d(a, p, q):
    """||A||_{p->q} = max ||A v||_q / ||v||_p for A with 2 columns, over 400000 angles of v.

    The grid (spacing 1.6e-5 rad, containing the axes) puts the maximum within ~1e-10 relative
    of the true one, far below the tolerances it is compared with.
    """
    theta = np.linspace(0, 2 * np.pi, 400_000, endpoint=False)
    v = np.stack([np.cos(theta), np.sin(theta)])
    return np.max(np.linalg.norm(a @ v, q, axis=0) / np.linalg.norm(v, p, axis=0))
