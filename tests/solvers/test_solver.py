"""Tests of the residual inverse and its implicit gradient (`tfp_resflow.solvers.solver`)."""

import numpy as np
import pytest
import tensorflow as tf
from test_fixed_point import contraction_fn, slow_contraction_fn

from tfp_resflow.solvers import solver


def test_unknown_solver_fails_before_solving():
    with pytest.raises(ValueError, match="solver must be one of .*got 'bogus'"):
        solver.solve_residual(
            tf.tanh, tf.zeros([1, 2]), atol=1e-6, rtol=1e-6, max_iterations=2, solver="bogus"
        )


@pytest.mark.parametrize("name", solver.SOLVER_NAMES)
@pytest.mark.parametrize("execution", ["eager", "function"])
def test_implicit_gradient_with_explicit_parameters_matches_finite_differences(execution, name):
    g, w, b = contraction_fn()
    z = tf.constant(np.random.default_rng(2).normal(size=(2, 3)))
    weights = tf.constant(np.random.default_rng(3).normal(size=(2, 3)))

    def loss(z, w, b, name=name):
        x, converged = solver.solve_residual(
            lambda t: g(t, w, b),
            z,
            parameters=(w, b),
            atol=1e-13,
            rtol=1e-13,
            max_iterations=1000,
            solver=name,
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
            # The solution does not depend on the solver: the cheapest one for the references.
            difference = float(loss(*plus, "plain")[0]) - float(loss(*minus, "plain")[0])
            expected[index] = difference / (2 * eps)
        np.testing.assert_allclose(gradient, expected, atol=1e-7)


@pytest.mark.parametrize("name", solver.SOLVER_NAMES)
def test_solve_and_gradient_compile_with_xla(name):
    g = slow_contraction_fn(lipschitz=0.9, size=3, seed=7, dtype=tf.float32)
    z = tf.constant(0.1 * np.random.default_rng(7).normal(size=(2, 3)), tf.float32)

    def solve_and_gradient(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            x, converged = solver.solve_residual(
                g, z, atol=1e-6, rtol=1e-6, max_iterations=500, solver=name
            )
            value = tf.reduce_sum(tf.sin(x))
        return x, converged, tape.gradient(value, z)

    compiled = tf.function(solve_and_gradient, jit_compile=True)(z)
    # XLA fuses and reorders float32 operations, so the two runs stop at different iterates.
    # Each stops within (atol + rtol |x|) / (1 - Lip) of the fixed point (here of x, and of the
    # implicit gradient's own fixed point), so they may differ by twice that: about 1.4e-4 for
    # gradients near 5.7 (measured on an AMD EPYC: 1.5e-5; 1e-5 was tighter than the solver).
    for got, expected in zip(compiled, solve_and_gradient(z), strict=True):
        bound = 2 * (1e-6 + 1e-6 * np.abs(np.asarray(expected, np.float64))) / (1 - 0.9)
        assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= bound)
    assert compiled[1].numpy().all()
