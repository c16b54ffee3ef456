"""Fixed-point solvers: their signature, tolerances and the plain iteration.

Every solver has one signature,

    solver(step, start, scale, *, atol, rtol, max_iterations) -> (x, converged)

and iterates `x <- step(x)` per example (the first axis is the batch) until every element of
the example moves by at most `atol + rtol * |scale|`; `converged` is a per-example flag. `plain`
is the iteration itself; `anderson` often needs far fewer evaluations of `step` when the map
contracts slowly (its Lipschitz constant close to 1), where the plain iteration is slowest.
`tfp_resflow.solvers.anderson` holds the accelerated solver; `solver.SOLVERS` registers both by
name, and `solver.solve_residual` uses them for the inverse of a residual block and for its
gradient.

References:
    Walker, Ni (2011). Anderson acceleration for fixed-point iterations. SIAM J. Numer. Anal.
    49(4), 1715-1735. https://doi.org/10.1137/10078356X
"""

from collections.abc import Callable

import tensorflow as tf

__all__ = [
    "DEFAULT_TOLERANCE",
    "Solver",
    "Step",
    "fixed_point",
    "per_example_done",
    "plain",
    "tolerances",
]

Solver = Callable[..., tuple[tf.Tensor, tf.Tensor]]
Step = Callable[[tf.Tensor], tf.Tensor]

# Default fixed-point tolerances per dtype: a few hundred ulps, so that the iteration stops at
# the precision of the arithmetic instead of at an arbitrary 1e-5 (the authors' squared-step test
# effectively stops at |step| ~ 3e-3).
DEFAULT_TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-12}


def tolerances(dtype: tf.DType, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """`(atol, rtol)` with the defaults of `DEFAULT_TOLERANCE` filled in for `dtype`."""
    default = DEFAULT_TOLERANCE.get(tf.as_dtype(dtype).name, 1e-6)
    return (default if atol is None else atol), (default if rtol is None else rtol)


def per_example_done(new: tf.Tensor, old: tf.Tensor, tolerance: tf.Tensor) -> tf.Tensor:
    """`[batch]`: every element of the example moved by at most `tolerance`."""
    ok = tf.abs(new - old) <= tolerance
    return tf.reduce_all(tf.reshape(ok, [tf.shape(ok)[0], -1]), axis=1)


def plain(
    step: Step,
    start: tf.Tensor,
    scale: tf.Tensor,
    *,
    atol: float,
    rtol: float,
    max_iterations: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Iterates `x <- step(x)` until every element moves by at most `atol + rtol * |scale|`.

    Args:
        step: the map, `[batch, *event] -> [batch, *event]`.
        start: the first iterate, `[batch, *event]`.
        scale: tensor of the same shape setting the relative tolerance (e.g. the right-hand side).
        atol: absolute tolerance per element.
        rtol: relative tolerance per element.
        max_iterations: cap on the number of steps.

    Returns:
        `(x, converged)`: the last iterate and a per-example flag of shape `[batch]`.
    """
    tolerance = atol + rtol * tf.abs(scale)

    def body(i: tf.Tensor, x: tf.Tensor, done: tf.Tensor) -> tuple[tf.Tensor, ...]:
        new = step(x)
        return i + 1, new, per_example_done(new, x, tolerance)

    _, x, done = tf.while_loop(
        lambda i, x, done: tf.logical_and(i < max_iterations, ~tf.reduce_all(done)),
        body,
        (tf.constant(0), start, tf.zeros([tf.shape(start)[0]], tf.bool)),
    )
    return x, done


# The name other modules and older code call the plain iteration by.
fixed_point = plain
