"""Tests of the fixed-point solver and its implicit gradient (`tfp_resflow.solver`)."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow import solver


def contraction_fn(lipschitz=0.7, size=3, seed=0):
    """g(x) = lipschitz * tanh(x W + b) with ||W||_2 = 1, and its parameters (W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(size, size))
    w = tf.constant(w / np.linalg.norm(w, 2), tf.float64)
    b = tf.constant(rng.normal(size=size), tf.float64)

    def g(x, w=w, b=b):
        return lipschitz * tf.tanh(tf.matmul(x, w) + b)

    return g, w, b


def test_fixed_point_converges_per_example_and_reports_failures():
    z = tf.constant(np.random.default_rng(1).normal(size=(4, 3)))
    g, _, _ = contraction_fn()
    x, done = solver.fixed_point(
        lambda x: z - g(x), z, z, atol=1e-12, rtol=1e-12, max_iterations=500
    )
    assert done.numpy().all()
    np.testing.assert_allclose(x + g(x), z, atol=1e-10)
    _, done = solver.fixed_point(lambda x: z - g(x), z, z, atol=1e-12, rtol=0.0, max_iterations=2)
    assert not done.numpy().any()
    np.testing.assert_array_equal(solver.nan_unless(done, x).numpy(), np.nan)


def test_default_tolerances_follow_the_dtype():
    assert solver.tolerances(tf.float64, None, None) == (1e-12, 1e-12)
    assert solver.tolerances(tf.float32, 1e-3, None) == (1e-3, 1e-6)


@pytest.mark.parametrize("execution", ["eager", "function"])
def test_implicit_gradient_with_explicit_parameters_matches_finite_differences(execution):
    g, w, b = contraction_fn()
    z = tf.constant(np.random.default_rng(2).normal(size=(2, 3)))
    weights = tf.constant(np.random.default_rng(3).normal(size=(2, 3)))

    def loss(z, w, b):
        x, converged = solver.solve_residual(
            lambda t: g(t, w, b),
            z,
            parameters=(w, b),
            atol=1e-13,
            rtol=1e-13,
            max_iterations=1000,
        )
        return tf.reduce_sum(weights * x), converged

    def loss_and_gradients(z, w, b):
        with tf.GradientTape() as tape:
            tape.watch([z, w, b])
            value, converged = loss(z, w, b)
        return value, converged, tape.gradient(value, [z, w, b])

    if execution == "function":
        loss_and_gradients = tf.function(loss_and_gradients)
    _, converged, gradients = loss_and_gradients(z, w, b)
    assert converged.numpy().all()
    eps = 1e-6
    for argument, gradient in zip((z, w, b), gradients, strict=True):
        expected = np.zeros(argument.shape)
        for index in np.ndindex(*argument.shape):
            step = np.zeros(argument.shape)
            step[index] = eps
            args = [z, w, b]
            position = [a is argument for a in args].index(True)
            plus, minus = list(args), list(args)
            plus[position] = argument + step
            minus[position] = argument - step
            expected[index] = (float(loss(*plus)[0]) - float(loss(*minus)[0])) / (2 * eps)
        np.testing.assert_allclose(gradient, expected, atol=1e-7)
