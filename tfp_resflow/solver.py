"""The fixed-point inverse of a residual map and its implicit gradient.

For `z = x + g(x)` with `Lip(g) < 1`, the map `x -> z - g(x)` is a contraction, so iterating it
converges geometrically (at rate `Lip(g)`) to the unique `x` (Behrmann et al., 2019). Its
gradient is not taken through the iterations: with `dL/dx` given,

    dL/dz = a  with  a (I + J_g(x)) = dL/dx,  i.e. the fixed point of  a -> dL/dx - a J_g(x)
    dL/dtheta = -a dg/dtheta

another contraction (Lip of `a -> a J` is also below 1), solved with vector-Jacobian products.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen (2019). Invertible Residual Networks. ICML.
    https://arxiv.org/abs/1811.00995
"""

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

__all__ = ["DEFAULT_TOLERANCE", "fixed_point", "solve_residual"]

# Default fixed-point tolerances per dtype: a few hundred ulps, so that the iteration stops at
# the precision of the arithmetic instead of at an arbitrary 1e-5 (the authors' squared-step test
# effectively stops at |step| ~ 3e-3).
DEFAULT_TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-12}


def tolerances(dtype: tf.DType, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """`(atol, rtol)` with the defaults of `DEFAULT_TOLERANCE` filled in for `dtype`."""
    default = DEFAULT_TOLERANCE.get(tf.as_dtype(dtype).name, 1e-6)
    return (default if atol is None else atol), (default if rtol is None else rtol)


def fixed_point(
    step: Callable[[tf.Tensor], tf.Tensor],
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

    def per_example_done(new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
        ok = tf.abs(new - old) <= tolerance
        return tf.reduce_all(tf.reshape(ok, [tf.shape(ok)[0], -1]), axis=1)

    def body(i: tf.Tensor, x: tf.Tensor, done: tf.Tensor) -> tuple[tf.Tensor, ...]:
        new = step(x)
        return i + 1, new, per_example_done(new, x)

    _, x, done = tf.while_loop(
        lambda i, x, done: tf.logical_and(i < max_iterations, ~tf.reduce_all(done)),
        body,
        (tf.constant(0), start, tf.zeros([tf.shape(start)[0]], tf.bool)),
    )
    return x, done


def nan_unless(converged: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """`x` with the examples that did not converge (`converged[b]` False) replaced by NaN."""
    mask = tf.reshape(converged, tf.concat([[-1], tf.ones([tf.rank(x) - 1], tf.int32)], 0))
    return tf.where(mask, x, tf.constant(float("nan"), x.dtype))


def solve_residual(
    residual_fn: Callable[[tf.Tensor], tf.Tensor],
    z: tf.Tensor,
    *,
    start: tf.Tensor | None = None,
    parameters: Sequence[tf.Tensor] = (),
    atol: float,
    rtol: float,
    max_iterations: int,
    gradient_check: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Solves `x + g(x) = z` by fixed-point iteration, with the implicit gradient.

    Args:
        residual_fn: `g` with `Lip(g) < 1`, `[batch, *event] -> [batch, *event]`.
        z: the right-hand side, `[batch, *event]`.
        start: first iterate (a warm start, not differentiated); default `z - g(z)`, one
            iteration from `z`, as the authors start.
        parameters: tensors `g` reads by closure that need gradients (the variables `g` reads
            are found automatically).
        atol: absolute tolerance of the iteration (and of the gradient's).
        rtol: relative tolerance, times `|z|` (times `|dL/dx|` for the gradient).
        max_iterations: cap on the iterations of each solve.
        gradient_check: assert (at run time) that the gradient's iteration converged; its
            unconverged examples are NaN in any case.

    Returns:
        `(x, converged)`: the last iterate `[batch, *event]` and a float per-example flag
        `[batch]` (1 converged, 0 not), which carries no gradient.
    """
    num_parameters = len(parameters)

    @tf.custom_gradient
    def solve(z_in: tf.Tensor, *parameters_in: tf.Tensor) -> tuple[Any, Callable[..., Any]]:
        del parameters_in  # The same tensors that `residual_fn` reads.
        x0 = z_in - residual_fn(z_in) if start is None else tf.stop_gradient(start)
        x, converged = fixed_point(
            lambda x: z_in - residual_fn(x),
            x0,
            z_in,
            atol=atol,
            rtol=rtol,
            max_iterations=max_iterations,
        )

        def grad_fn(dx: tf.Tensor, d_converged: Any, variables: list | None = None) -> Any:
            del d_converged
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([x, *parameters])  # variables `g` reads are watched automatically
                gx = residual_fn(x)
            a, ok = fixed_point(
                lambda a: dx - tape.gradient(gx, x, output_gradients=a),
                dx,
                dx,
                atol=atol,
                rtol=rtol,
                max_iterations=max_iterations,
            )
            if gradient_check:
                # No residual here: a tf.cond in a gradient breaks pfor (batch_jacobian).
                check = tf.debugging.Assert(
                    tf.reduce_all(ok),
                    [
                        "the implicit gradient of a residual block's fixed-point inverse did "
                        f"not converge within {max_iterations} iterations (tolerances "
                        f"{(atol, rtol)}); examples not converged:",
                        tf.reduce_sum(tf.cast(~ok, tf.int32)),
                    ],
                )
                with tf.control_dependencies([check]):
                    a = tf.identity(a)
            a = nan_unless(ok, a)
            watched = [*parameters, *(variables or [])]
            grads = tape.gradient(
                gx, watched, output_gradients=-a, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            input_grads = [a, *grads[:num_parameters]]
            if variables is None:
                return input_grads
            return input_grads, grads[num_parameters:]

        return (x, tf.cast(converged, z_in.dtype)), grad_fn

    x, converged = solve(z, *parameters)
    return x, tf.stop_gradient(converged)
