"""The fixed-point inverse of a residual map and its implicit gradient.

For `z = x + g(x)` with `Lip(g) < 1`, the map `x -> z - g(x)` is a contraction, so iterating it
converges geometrically (at rate `Lip(g)`) to the unique `x` (Behrmann et al., 2019). Its
gradient is not taken through the iterations: with `dL/dx` given,

    dL/dz = a  with  a (I + J_g(x)) = dL/dx,  i.e. the fixed point of  a -> dL/dx - a J_g(x)
    dL/dtheta = -a dg/dtheta

another contraction (Lip of `a -> a J` is also below 1), solved with vector-Jacobian products.

Both fixed points are found by a pluggable solver, `solver(step, start, scale, *, atol, rtol,
max_iterations) -> (x, converged)`, registered here by name in `SOLVERS`: `plain` iteration
(`tfp_resflow.solvers.fixed_point`), or `anderson` acceleration (`tfp_resflow.solvers.anderson`),
which often needs far fewer evaluations of `step` (each one a pass through the residual block) when
`Lip(g)` is close to 1, where the plain iteration is slowest.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen (2019). Invertible Residual Networks. ICML.
    https://arxiv.org/abs/1811.00995
    Walker, Ni (2011). Anderson acceleration for fixed-point iterations. SIAM J. Numer. Anal.
    49(4), 1715-1735. https://doi.org/10.1137/10078356X
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.solvers.anderson import anderson
from tfp_resflow.solvers.fixed_point import (
    DEFAULT_TOLERANCE,
    Solver,
    fixed_point,
    plain,
    tolerances,
)

__all__ = [
    "DEFAULT_TOLERANCE",  # re-exported from `fixed_point`, with `fixed_point` and `tolerances`,
    "SOLVERS",  # for `config`, `bijector`, `block_functions` and the notebooks
    "SOLVER_NAMES",
    "fixed_point",
    "get_solver",
    "nan_unless",
    "solve_residual",
    "tolerances",
]

SOLVERS: dict[str, Solver] = {"plain": plain, "anderson": anderson}
SOLVER_NAMES = tuple(SOLVERS)


def get_solver(name: str) -> Solver:
    """The solver registered in `SOLVERS` under `name`.

    Raises:
        ValueError: for a name not in `SOLVERS`.
    """
    return SOLVERS[validation.choice("solver", name, SOLVER_NAMES)]


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
    solver: str = "plain",
    jit_compile: bool = False,
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
        solver: the name in `SOLVERS` of the fixed-point solver, used for both the solve and
            the gradient's (its map `a -> dL/dx - a J_g(x)` is linear, where Anderson
            acceleration does best).
        jit_compile: compile the iteration (the first iterate and the solver's loop) with XLA.
            Only the iteration: the implicit gradient and the callers' convergence checks stay
            in TensorFlow, where `tf.debugging.Assert` raises (XLA drops it).

    Returns:
        `(x, converged)`: the last iterate `[batch, *event]` and a float per-example flag
        `[batch]` (1 converged, 0 not), which carries no gradient.
    """
    find_fixed_point = get_solver(solver)  # here, so an unknown name fails before any tracing
    options = {"atol": atol, "rtol": rtol, "max_iterations": max_iterations}

    @tf.custom_gradient
    def solve(z_in: tf.Tensor, *parameters_in: tf.Tensor) -> tuple[Any, Callable[..., Any]]:
        del parameters_in  # The same tensors that `residual_fn` reads.

        def iterate(z_in: tf.Tensor, *start_in: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            x0 = z_in - residual_fn(z_in) if not start_in else start_in[0]
            return find_fixed_point(lambda x: z_in - residual_fn(x), x0, z_in, **options)

        if jit_compile:  # the tensors `residual_fn` reads become the compiled function's inputs
            iterate = tf.function(iterate, autograph=False, jit_compile=True)
        starts = () if start is None else (tf.stop_gradient(start),)
        x, converged = iterate(z_in, *starts)

        def grad_fn(dx: tf.Tensor, d_converged: Any, variables: list | None = None) -> Any:
            del d_converged
            solve_gradient = functools.partial(find_fixed_point, **options)
            if gradient_check:
                solve_gradient = _checked(solve_gradient, options)
            return _implicit_gradient(residual_fn, parameters, solve_gradient, x, dx, variables)

        return (x, tf.cast(converged, z_in.dtype)), grad_fn

    x, converged = solve(z, *parameters)
    return x, tf.stop_gradient(converged)


def _implicit_gradient(
    residual_fn: Callable[[tf.Tensor], tf.Tensor],
    parameters: Sequence[tf.Tensor],
    solve: Callable[..., tuple[tf.Tensor, tf.Tensor]],
    x: tf.Tensor,
    dx: tf.Tensor,
    variables: list | None,
) -> Any:
    """Gradients for `z`, `parameters` (and `variables`) from `a (I + J_g(x)) = dL/dx`.

    `solve(step, start, scale)` is the fixed-point solver with its tolerances bound.
    """
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, *parameters])  # variables `g` reads are watched automatically
        gx = residual_fn(x)
    a, ok = solve(lambda a: dx - tape.gradient(gx, x, output_gradients=a), dx, dx)
    a = nan_unless(ok, a)
    watched = [*parameters, *(variables or [])]
    grads = tape.gradient(
        gx, watched, output_gradients=-a, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    input_grads = [a, *grads[: len(parameters)]]
    if variables is None:
        return input_grads
    return input_grads, grads[len(parameters) :]


def _checked(
    solve: Callable[..., tuple[tf.Tensor, tf.Tensor]], options: dict[str, Any]
) -> Callable[..., tuple[tf.Tensor, tf.Tensor]]:
    """`solve`, asserting at run time that every example's iteration converged."""

    def checked_solve(*args: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        a, ok = solve(*args)
        # No residual here: a tf.cond in a gradient breaks pfor (batch_jacobian).
        check = tf.debugging.Assert(
            tf.reduce_all(ok),
            [
                "the implicit gradient of a residual block's fixed-point inverse did "
                f"not converge within {options['max_iterations']} iterations (tolerances "
                f"{(options['atol'], options['rtol'])}); examples not converged:",
                tf.reduce_sum(tf.cast(~ok, tf.int32)),
            ],
        )
        with tf.control_dependencies([check]):
            return tf.identity(a), ok

    return checked_solve
