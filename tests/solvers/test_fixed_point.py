"""Tests of the fixed-point solvers (`fixed_point`): plain iteration and Anderson."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.solvers import anderson, fixed_point, solver


def contraction_fn(lipschitz=0.7, size=3, seed=0):
    """g(x) = lipschitz * tanh(x W + b) with ||W||_2 = 1, and its parameters (W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(size, size))
    w = tf.constant(w / np.linalg.norm(w, 2), tf.float64)
    b = tf.constant(rng.normal(size=size), tf.float64)

    def g(x, w=w, b=b):
        return lipschitz * tf.tanh(tf.matmul(x, w) + b)

    return g, w, b


def slow_contraction_fn(lipschitz=0.9, size=8, seed=0, dtype=tf.float64):
    """`contraction_fn`'s g with a symmetric W of spectrum [-1, 1] and b = 0, so that near 0
    (tanh' ~ 1) the plain iteration contracts at about `lipschitz`, its worst rate."""
    g, _, _ = contraction_fn(lipschitz, size, seed)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    w = tf.constant(q @ np.diag(np.linspace(-1.0, 1.0, size)) @ q.T, dtype)
    return functools.partial(g, w=w, b=tf.zeros([size], dtype))


def counting(step):
    """`step` and a list whose first element counts its (eager) evaluations."""
    calls = [0]

    def counted(x):
        calls[0] += 1
        return step(x)

    return counted, calls


@pytest.mark.parametrize("name", solver.SOLVER_NAMES)
def test_fixed_point_converges_per_example_and_reports_failures(name):
    solve = solver.get_solver(name)
    z = tf.constant(np.random.default_rng(1).normal(size=(4, 3)))
    g, _, _ = contraction_fn()
    x, done = solve(lambda x: z - g(x), z, z, atol=1e-12, rtol=1e-12, max_iterations=500)
    assert done.numpy().all()
    np.testing.assert_allclose(x + g(x), z, atol=1e-10)
    _, done = solve(lambda x: z - g(x), z, z, atol=1e-12, rtol=0.0, max_iterations=2)
    assert not done.numpy().any()
    np.testing.assert_array_equal(solver.nan_unless(done, x).numpy(), np.nan)


@pytest.mark.parametrize("name", solver.SOLVER_NAMES)
def test_examples_converge_independently(name):
    """Examples needing 1 to hundreds of plain steps: each is judged (and kept) on its own."""
    solve = solver.get_solver(name)
    rng = np.random.default_rng(4)
    g = slow_contraction_fn(lipschitz=1.0, size=3, seed=4)
    # Per-example Lipschitz constants; the first example starts at its solution.
    lipschitz = tf.constant([[0.5], [0.0], [0.3], [0.9], [0.99]], tf.float64)
    solution = tf.constant(0.1 * rng.normal(size=(5, 3)))
    z = solution + lipschitz * g(solution)
    start = tf.concat([solution[:1], z[1:]], 0)

    def step(x):
        return z - lipschitz * g(x)

    x, done = solve(step, start, z, atol=1e-12, rtol=1e-12, max_iterations=5000)
    assert done.numpy().all()
    np.testing.assert_allclose(x, solution, rtol=0, atol=1e-9)
    np.testing.assert_allclose(x + lipschitz * g(x), z, rtol=0, atol=1e-11)
    # Two evaluations: the solution is a fixed point at once, and with g = 0 the second step
    # does not move; the others are far from converged.
    x, done = solve(step, start, z, atol=1e-12, rtol=0.0, max_iterations=2)
    np.testing.assert_array_equal(done, [True, True, False, False, False])
    np.testing.assert_allclose(x[:2], solution[:2], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tolerance"), [(tf.float32, 1e-6), (tf.float64, 1e-12)])
def test_anderson_needs_far_fewer_evaluations_than_plain_iteration(dtype, tolerance):
    g = slow_contraction_fn(lipschitz=0.9, size=8, seed=5, dtype=dtype)
    z = tf.constant(0.1 * np.random.default_rng(5).normal(size=(3, 8)), dtype)
    evaluations = {}
    for name in ("plain", "anderson"):
        step, calls = counting(lambda x: z - g(x))
        x, done = solver.get_solver(name)(
            step, z, z, atol=tolerance, rtol=tolerance, max_iterations=1000
        )
        assert done.numpy().all()
        np.testing.assert_allclose(x + g(x), z, rtol=0, atol=30 * tolerance)
        evaluations[name] = calls[0]
    print(f"{dtype.name} at {tolerance}: evaluations of step {evaluations}")
    assert evaluations["anderson"] <= evaluations["plain"] / 2


@pytest.mark.parametrize("beyond", ["nan", "huge"])
def test_anderson_safeguard_falls_back_to_plain_steps(beyond):
    """A map defined (finite, or contracting) only on the side of its fixed point that the plain
    iteration approaches from: Anderson's secant-like extrapolation overshoots into the other
    side (its residual is concave there), where the step is NaN or jumps far away."""
    rng = np.random.default_rng(6)
    solution = tf.constant(rng.normal(size=(4, 3)))
    start = solution - rng.uniform(0.5, 3.0, size=(4, 3))

    def step(x):
        e = solution - x
        inside = solution - e * (0.1 + 0.8 * e / (1 + e))  # Lipschitz 0.9 for e >= 0
        outside = (
            tf.fill(tf.shape(x), tf.constant(np.nan, x.dtype))
            if beyond == "nan"
            else solution + 1e3
        )
        return tf.where(e >= 0, inside, outside)

    kwargs = {"atol": 1e-12, "rtol": 1e-12, "max_iterations": 60}
    x_plain, done_plain = fixed_point.plain(step, start, start, **kwargs)
    x, done = anderson.anderson(step, start, start, **kwargs)
    _, done_raw = anderson.anderson(step, start, start, safeguard=False, **kwargs)
    assert done_plain.numpy().all()
    assert done.numpy().all()
    np.testing.assert_allclose(x, x_plain, rtol=0, atol=1e-11)
    np.testing.assert_allclose(x, solution, rtol=0, atol=1e-11)
    assert not done_raw.numpy().all()  # what the safeguard prevents


def test_default_tolerances_follow_the_dtype():
    assert fixed_point.tolerances(tf.float64, None, None) == (1e-12, 1e-12)
    assert fixed_point.tolerances(tf.float32, 1e-3, None) == (1e-3, 1e-6)


def test_solvers_are_found_by_name():
    assert solver.SOLVER_NAMES == ("plain", "anderson")
    assert solver.get_solver("anderson") is anderson.anderson
    assert solver.get_solver("plain") is fixed_point.plain is fixed_point.fixed_point
    with pytest.raises(
        ValueError, match=r"solver must be one of \('plain', 'anderson'\); got 'bogus'"
    ):
        solver.get_solver("bogus")


def test_solver_re_exports_the_plain_iteration_and_its_tolerances():
    for name in ("DEFAULT_TOLERANCE", "fixed_point", "tolerances"):
        assert getattr(solver, name) is getattr(fixed_point, name)
    assert solver.SOLVERS == {"plain": fixed_point.plain, "anderson": anderson.anderson}


def test_anderson_needs_a_positive_memory():
    z = tf.zeros([1, 2], tf.float64)
    with pytest.raises(ValueError, match="memory must be an integer >= 1; got 0"):
        anderson.anderson(tf.identity, z, z, atol=1e-6, rtol=1e-6, max_iterations=2, memory=0)
