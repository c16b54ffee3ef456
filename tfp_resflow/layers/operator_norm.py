"""Induced operator norms ||A||_{p->q} of linear maps: closed forms and the power method.

A linear operator A (a dense map or a convolution, given by `forward` and its exact adjoint
`adjoint`) has the induced mixed norm from l_p (its domain) to l_q (its codomain)

    ||A||_{p->q} = max_{v != 0} ||A v||_q / ||v||_p,   p, q in [1, inf],

the smallest c with ||A v||_q <= c ||v||_p for every v; (2, 2) is the spectral norm. Any v
gives the lower bound ||A v||_q / ||v||_p, and a maximiser attains the norm. Dual exponents
are written r*, with 1/r + 1/r* = 1 (1* = inf, inf* = 1).

Closed forms. For p = 1 the ratio is largest at a basis vector, for q = inf at one output
coordinate, so

    ||A||_{1->q}   = max_j ||A[:, j]||_q        (largest column q-norm)
    ||A||_{p->inf} = max_i ||A[i, :]||_{p*}     (largest row p*-norm)

Column sums of |A|**r are A_r^T 1 and row sums A_r 1, where A_r is the same operator with the
kernel |W|**r; so a convolution needs no explicit matrix. For r = inf the norm is the largest
entry of A, among the kernel taps that meet the image (`tap_mask`). Both forms are exact and
differentiable in the kernel.

Duality maps. For finite r >= 1 and y != 0,

    dual_r(y) = sign(y) |y|**(r - 1) / ||y||_r**(r - 1)

has ||dual_r(y)||_{r*} = 1 and <dual_r(y), y> = ||y||_r: the equality case of Hoelder's
inequality <z, y> <= ||z||_{r*} ||y||_r (dual_2(y) = y / ||y||_2).

Generalized power method (Boyd 1974, Higham 1992). Otherwise the norm is estimated by

    u <- dual_q(A v),   v <- dual_{p*}(A^T u),   sigma = ||A v||_q / ||v||_p

which for (2, 2) is the ordinary power method on A^T A. By Hoelder's inequality, used twice,
sigma never decreases from one step to the next. For (2, 2) it converges to the largest
singular value from almost every start;
for other orders computing ||A||_{p->q} is NP-hard in general (Hendrickx & Olshevsky 2010 for
p = q; Bhaskara & Vijayaraghavan 2011 for many p > q), and the method may stop at a local
maximum: sigma is then a lower bound only. An unconverged sigma is a lower bound too.

Orders are Python floats in [1, inf] (static: closed forms and special cases apply) or scalar
Tensors in (1, 5) read from a learnable `NormOrder` (always the general formulas).

References:
    Boyd (1974), The power method for l^p norms, Linear Algebra Appl. 9.
    Higham (1992), Estimating the matrix p-norm, Numer. Math. 62.
    Hendrickx & Olshevsky (2010), Matrix p-norms are NP-hard to approximate if p != 1, 2, inf,
    SIAM J. Matrix Anal. Appl. 31.
    Bhaskara & Vijayaraghavan (2011), Approximating matrix p-norms, SODA.
"""

__all__ = [
    "ConvOperator",
    "MatrixOperator",
    "Operator",
    "Order",
    "check_order",
    "closed_form_norm",
    "has_closed_form",
    "norm_ratio",
    "power_method",
]

import contextlib
import functools
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.gram_iteration import conv_operator_matrices

_INF = math.inf

# An order is a Python float in [1, inf] (static: closed forms and special cases apply) or a
# scalar Tensor in (1, 5) read from a `NormOrder` (always the general formulas).
Order = float | tf.Tensor


def check_order(name: str, value: object) -> float:
    """A fixed order: a number in [1, inf] or 'inf' (also 'infinity', any case), as a float."""
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return _INF
    with contextlib.suppress(ValueError):
        return validation.number(name, value, at_least=1)
    validation.fail(name, "a number in [1, inf] or 'inf'", value)


def _is(r: Order, value: float) -> bool:
    """Whether r is the static order `value` (a learned order is never 1, 2 or inf)."""
    return isinstance(r, float) and r == value


def has_closed_form(p: object, q: object) -> bool:
    """Whether ||A||_{p->q} has a closed form: p = 1 or q = inf, the other order any.

    Learnable orders (`NormOrder`s or their tensors) never reach 1 or inf.
    """
    return _is(p, 1.0) or _is(q, _INF)


def _dual(r: Order) -> Order:
    """Dual exponent r* with 1/r + 1/r* = 1."""
    if not isinstance(r, float):
        return r / (r - 1.0)
    return _INF if r == 1 else 1.0 if r == _INF else r / (r - 1.0)


def _safe(m: tf.Tensor) -> tf.Tensor:
    return tf.where(m > 0, m, tf.ones_like(m))


def _root(m: tf.Tensor, s: tf.Tensor, r: Order) -> tf.Tensor:
    """Returns m * s**(1/r), with a zero (not NaN) gradient at s = 0 (e.g. a zero kernel)."""
    positive = s > 0
    return tf.where(positive, m * tf.where(positive, s, tf.ones_like(s)) ** (1.0 / r), 0.0)


def _lp_norm(x: tf.Tensor, r: Order) -> tf.Tensor:
    """The l_r norm of all entries of `x`, scaled by max|x| so large `r` cannot overflow."""
    a = tf.abs(x)
    m = tf.reduce_max(a)
    if _is(r, _INF):
        return m
    return _root(m, tf.reduce_sum((a / _safe(m)) ** r), r)


def _dualize(y: tf.Tensor, r: Order, fallback: tf.Tensor) -> tf.Tensor:
    """Returns z = dual_r(y), with ||z||_{r*} = 1 and <z, y> = ||y||_r, for finite r >= 1.

    A zero `y` (e.g. a zero kernel) has no such z; `fallback` is returned instead, so the
    iteration restarts when `y` moves away.
    """
    m = tf.reduce_max(tf.abs(y))
    z = y if _is(r, 2.0) else tf.sign(y) * (tf.abs(y) / _safe(m)) ** (r - 1.0)
    return tf.where(m > 0, z / _safe(_lp_norm(z, _dual(r))), fallback)


def _small_change(new: tf.Tensor, old: tf.Tensor, atol: float, rtol: float) -> tf.Tensor:
    # Per-element RMS change, as the authors, with atol and rtol each used for its own role.
    rms = tf.norm(new - old) / tf.sqrt(tf.cast(tf.size(new), new.dtype))
    return rms < atol + rtol * tf.reduce_max(tf.abs(new))


class Operator:
    """A linear map `forward(v, kernel)` with its adjoint, on vectors of fixed shapes.

    Equal (and hashing equal) when the type and shapes are: the power iteration is shared.
    """

    v_shape: list
    u_shape: list

    def _key(self) -> tuple:
        return (type(self).__name__, tuple(self.v_shape), tuple(self.u_shape))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Operator) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class MatrixOperator(Operator):
    """A = W^T for a kernel W of shape [n_in, n_out] (y = x W); vectors have shape [1, n]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        self.v_shape, self.u_shape, self.tap_mask = [1, n_in], [1, n_out], 1.0

    def forward(self, v: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.matmul(v, kernel)

    def gram_matrices(self, kernel: tf.Tensor) -> tf.Tensor:
        """`[1, n_in, n_out]`: the matrix whose largest singular value is ||A||_{2->2}."""
        return kernel[None]

    def adjoint(self, u: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.matmul(u, kernel, transpose_b=True)


class ConvOperator(Operator):
    """The convolution on one [1, H, W, C_in] image, with its exact adjoint."""

    def __init__(
        self, in_shape: list, out_shape: list, strides: tuple, padding: str, tap_mask: np.ndarray
    ) -> None:
        self.v_shape, self.u_shape = in_shape, out_shape
        self.strides, self.padding = list(strides), padding.upper()
        self.tap_mask = tap_mask  # 1 for kernel taps that touch the image at least once

    def _key(self) -> tuple:
        return (*super()._key(), tuple(self.strides), self.padding)

    def forward(self, v: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(v, kernel, self.strides, self.padding)

    def gram_matrices(self, kernel: tf.Tensor) -> tf.Tensor:
        """Matrices whose largest singular value bounds ||A||_{2->2} from above.

        The explicit operator or the circular convolution (`gram_iteration.conv_operator_matrices`).
        """
        in_shape, out_shape = tuple(self.v_shape[1:]), tuple(self.u_shape[1:])
        return conv_operator_matrices(
            kernel, in_shape, out_shape, tuple(self.strides), self.padding
        )

    def adjoint(self, u: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d_transpose(u, kernel, self.v_shape, self.strides, self.padding)


def closed_form_norm(op: Operator, kernel: tf.Tensor, p: Order, q: Order) -> tf.Tensor:
    """Exact ||A||_{p->q} for p = 1 or q = inf (module docs), differentiable in `kernel`."""
    r = q if _is(p, 1.0) else _dual(p)
    a = tf.abs(kernel)
    if _is(r, _INF):  # largest entry of A
        return tf.reduce_max(a * tf.cast(op.tap_mask, a.dtype))
    m = tf.reduce_max(a)
    powered = (a / _safe(m)) ** r
    if _is(p, 1.0):
        sums = op.adjoint(tf.ones(op.u_shape, a.dtype), powered)
    else:
        sums = op.forward(tf.ones(op.v_shape, a.dtype), powered)
    return _root(m, tf.reduce_max(sums), r)


def norm_ratio(op: Operator, kernel: tf.Tensor, v: tf.Tensor, p: Order, q: Order) -> tf.Tensor:
    """The lower bound ||A v||_q / ||v||_p on ||A||_{p->q} (0 for a zero `v`)."""
    return _lp_norm(op.forward(v, kernel), q) / _safe(_lp_norm(v, p))


def _static(order: Order) -> float | None:
    """A fixed order's value, or None for a learned one (passed to the iteration as a tensor)."""
    return order if isinstance(order, float) else None


@functools.lru_cache(maxsize=256)
def _power_iteration(
    op: Operator,
    p: float | None,
    q: float | None,
    atol: float | None,
    rtol: float | None,
    max_iterations: int,
) -> Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """The power method for one operator shape and pair of orders, traced once and shared.

    Returns `iterate(kernel, u, v, *learned_orders) -> (u, v, sigma)`, a `tf.function`;
    `learned_orders` are the scalar tensors of the orders given here as None. Every layer with
    the same operator and orders calls the same function, which is not inlined into callers:
    a deep flow's power iterations cost one trace per kind of layer, not one (eager, or
    inlined) loop per layer.
    """

    def iterate(
        kernel: tf.Tensor, u: tf.Tensor, v: tf.Tensor, *learned: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        learned_orders = iter(learned)
        p_, q_ = (order if order is not None else next(learned_orders) for order in (p, q))

        def body(i: tf.Tensor, u: tf.Tensor, v: tf.Tensor, done: tf.Tensor) -> tuple:
            u_new = _dualize(op.forward(v, kernel), q_, u)
            v_new = _dualize(op.adjoint(u_new, kernel), _dual(p_), v)
            if atol is None:
                done = tf.zeros([], tf.bool)  # fixed count: never stop early
            else:
                done = _small_change(u_new, u, atol, rtol) & _small_change(v_new, v, atol, rtol)
            return i + 1, u_new, v_new, done

        _, u, v, _ = tf.while_loop(
            lambda i, u, v, done: (i < max_iterations) & tf.logical_not(done),
            body,
            (tf.constant(0), u, v, tf.zeros([], tf.bool)),
        )
        return u, v, norm_ratio(op, kernel, v, p_, q_)

    return tf.function(
        functools.partial(iterate),  # TF counts retraces per code object; each op traces once
        autograph=False,
        reduce_retracing=True,
        experimental_attributes={"_noinline": True},
    )


def power_method(
    op: Operator,
    kernel: tf.Tensor,
    u: tf.Tensor,
    v: tf.Tensor,
    p: Order,
    q: Order,
    *,
    atol: float | None,
    rtol: float | None,
    max_iterations: int,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Runs the generalized power method (module docs) from the estimates `u`, `v`.

    Runs `max_iterations` steps, or, when `atol` is set, stops earlier once both u and v change
    by less than `atol + rtol * max|new|` (per-element RMS). Works eagerly and inside
    `tf.function` (a `tf.while_loop` in a shared, traced-once function).

    Args:
        op: The operator A.
        kernel: Its kernel (no gradient flows through the iterations).
        u: Start of the codomain-side estimate, of shape `op.u_shape`.
        v: Start of the domain-side estimate, of shape `op.v_shape`.
        p: Domain order, a float in (1, inf] or a scalar Tensor.
        q: Codomain order, a float in [1, inf) or a scalar Tensor.
        atol: Absolute tolerance, or None for exactly `max_iterations` steps.
        rtol: Relative tolerance (used with `atol`).
        max_iterations: Number of steps, or their cap with a tolerance.

    Returns:
        The new `(u, v, sigma)`, sigma = ||A v||_q / ||v||_p.
    """
    iterate = _power_iteration(op, _static(p), _static(q), atol, rtol, max_iterations)
    return iterate(kernel, u, v, *[order for order in (p, q) if not isinstance(order, float)])
