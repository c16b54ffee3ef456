"""Lipschitz-constrained Keras layers: soft normalisation by an induced operator norm.

Each layer applies a linear operator `A` (a dense map or a convolution) and rescales its
kernel so that the operator norm from `l_p` (domain) to `l_q` (codomain) is at most `c`:

    W_eff = W / max(1, sigma / c),   sigma ~= ||A||_{p->q} = max{ ||A v||_q / ||v||_p }

so a kernel already inside the bound is used unchanged, and the kernel variable itself is
never overwritten. `sigma` comes from a closed form when one exists (p = 1 or q = inf) and
otherwise from the generalized power method, whose singular-vector estimates `u`, `v` are
non-trainable weights:

    u <- dual_q(A v),   v <- dual_{p*}(A^T u),   sigma = ||A v||_q / ||v||_p

Orders are numbers, fixed at construction, or learnable `NormOrder`s (`tfp_resflow.norm_order`)
in (1, 5), shared between consecutive layers. `call` and the power iterations read a learnable
order without a gradient; `norm_order_loss` gives the orders their own objective, the mean of
the layers' norm estimates with the kernels and `v` held fixed (at a converged `v` its gradient
is that of the true norm: `v` maximises the ratio, so its own change does not count).

`call` never iterates (it is pure, so it can run inside nested tapes, loops and XLA). The
power iterations run only in `update_lipschitz`, which the training loop calls after every
optimizer step, and to a tolerance before evaluation, as the authors do. An unconverged
`sigma` underestimates the true norm, so the bound holds only after enough iterations. For
p > q the power method may also settle on a local maximum (computing such norms is NP-hard in
general), so there the bound is only as good as the estimate; p <= q, closed forms and (2, 2)
are not affected.

References:
    Chen et al. (2019), Residual Flows for Invertible Generative Modeling, Sec. 3.2 and D,
    https://arxiv.org/abs/1906.02735
    Gouk et al. (2021), Regularisation of neural networks by enforcing Lipschitz continuity,
    https://arxiv.org/abs/1804.04368
    Higham (1992), Estimating the matrix p-norm, Numer. Math. 62.
"""

__all__ = [
    "SpectralConv2D",
    "SpectralDense",
    "norm_order_loss",
    "spectral_layers",
    "update_lipschitz",
]

import functools
import math
import numbers
from collections.abc import Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow.norm_order import NormOrder

_INF = math.inf

# An order is a Python float in [1, inf] (static: closed forms and special cases apply) or a
# scalar Tensor in (1, 5) read from a `NormOrder` (always the general formulas).
Order = float | tf.Tensor


def _is(r: Order, value: float) -> bool:
    """Whether r is the static order `value` (a learned order is never 1, 2 or inf)."""
    return isinstance(r, float) and r == value


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
    """Returns z with ||z||_{r*} = 1 and <z, y> = ||y||_r, for finite r >= 1.

    z = sign(y) * |y|**(r - 1) / ||y||_r**(r - 1). A zero `y` (e.g. a zero kernel) has no
    such z; `fallback` is returned instead, so the iteration restarts when `y` moves away.
    """
    m = tf.reduce_max(tf.abs(y))
    z = y if _is(r, 2.0) else tf.sign(y) * (tf.abs(y) / _safe(m)) ** (r - 1.0)
    return tf.where(m > 0, z / _safe(_lp_norm(z, _dual(r))), fallback)


def _small_change(new: tf.Tensor, old: tf.Tensor, atol: float, rtol: float) -> tf.Tensor:
    # Per-element RMS change, as the authors, with atol and rtol each used for its own role.
    rms = tf.norm(new - old) / tf.sqrt(tf.cast(tf.size(new), new.dtype))
    return rms < atol + rtol * tf.reduce_max(tf.abs(new))


class _Operator:
    """Equal (and hashing equal) when the type and shapes are: the power iteration is shared."""

    def _key(self) -> tuple:
        return (type(self).__name__, tuple(self.v_shape), tuple(self.u_shape))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Operator) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class _MatrixOperator(_Operator):
    """A = W^T for a kernel W of shape [n_in, n_out] (y = x W); vectors have shape [1, n]."""

    def __init__(self, n_in: int, n_out: int) -> None:
        self.v_shape, self.u_shape, self.tap_mask = [1, n_in], [1, n_out], 1.0

    def forward(self, v: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.matmul(v, kernel)

    def adjoint(self, u: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.matmul(u, kernel, transpose_b=True)


class _ConvOperator(_Operator):
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

    def adjoint(self, u: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d_transpose(u, kernel, self.v_shape, self.strides, self.padding)


def _closed_form_norm(
    op: _MatrixOperator | _ConvOperator, kernel: tf.Tensor, p: Order, q: Order
) -> tf.Tensor:
    """Exact ||A||_{p->q} for p = 1 or q = inf, differentiable in `kernel`.

        ||A||_{1->q}   = max_j ||A[:, j]||_q        (largest column q-norm)
        ||A||_{p->inf} = max_i ||A[i, :]||_{p*}     (largest row p*-norm)

    Column sums of |A|**r are A_r^T 1, row sums A_r 1, where A_r is the same operator with
    the kernel |W|**r; so convolutions need no explicit matrix.
    """
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


def _check_order(name: str, value: object) -> float:
    """A fixed order: a number in [1, inf] or 'inf', as a float."""
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return _INF
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 1:
        raise ValueError(f"{name} must be a number in [1, inf] or 'inf'; got {value!r}")
    return float(value)


def _check_order_spec(name: str, value: object) -> float | NormOrder:
    """A fixed order, or a learnable `NormOrder` (also given as its serialized config)."""
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if isinstance(value, NormOrder):
        return value
    return _check_order(name, value)


def _order_config(order: float | NormOrder) -> object:
    if isinstance(order, NormOrder):
        # Every occurrence carries the object's id, so that Keras' object sharing (active
        # while saving and loading .keras files) restores one NormOrder for each tie. Keras
        # marks only repeats, on a dict that the enclosing serialization then copies: lost.
        config = keras.saving.serialize_keras_object(order)
        return {**config, "shared_object_id": id(order)}
    return "inf" if order == _INF else order  # not float('inf'), which JSON cannot hold


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_tolerance(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number or None; got {value!r}")
    return float(value)


def _check_initial_iterations(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"initial_power_iterations must be an integer >= 0 or None; got {value!r}")
    return int(value)


def _check_lipschitz_constant(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"lipschitz_constant must be in (0, 1); got {value!r}")
    return float(value)


def _static(order: Order) -> float | None:
    """A fixed order's value, or None for a learned one (passed to the iteration as a tensor)."""
    return order if isinstance(order, float) else None


@functools.lru_cache(maxsize=256)
def _power_iteration(
    op: "_MatrixOperator | _ConvOperator",
    p: float | None,
    q: float | None,
    atol: float | None,
    rtol: float | None,
    max_iterations: int,
) -> Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """The power method for one operator shape and pair of orders, traced once and shared.

    Returns `iterate(kernel, u, v, *learned_orders) -> (u, v, sigma)`, a `tf.function` that
    runs `max_iterations` steps, or stops earlier once both u and v change by less than
    `atol + rtol * max|new|` (per-element RMS) when `atol` is set; `learned_orders` are the
    scalar tensors of the orders given here as None. Every layer with the same operator and
    orders calls the same function, which is not inlined into callers: a deep flow's power
    iterations cost one trace per kind of layer, not one (eager, or inlined) loop per layer.
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
        sigma = _lp_norm(op.forward(v, kernel), q_) / _safe(_lp_norm(v, p_))
        return u, v, sigma

    return tf.function(
        functools.partial(iterate),  # TF counts retraces per code object; each op traces once
        autograph=False,
        reduce_retracing=True,
        experimental_attributes={"_noinline": True},
    )


class _SpectralLayer(keras.layers.Layer):
    """Shared logic: norm estimate, soft rescaling and power iteration (see module docs)."""

    def __init__(
        self,
        *,
        lipschitz_constant: float,
        domain: float | str | NormOrder,
        codomain: float | str | NormOrder,
        num_power_iterations: int,
        atol: float | None,
        rtol: float | None,
        max_iterations: int,
        initial_power_iterations: int | None,
        use_bias: bool,
        kernel_initializer: object,
        bias_initializer: object,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.lipschitz_constant = _check_lipschitz_constant(lipschitz_constant)
        self.domain = _check_order_spec("domain", domain)
        self.codomain = _check_order_spec("codomain", codomain)
        self.num_power_iterations = _check_count("num_power_iterations", num_power_iterations)
        self.atol = _check_tolerance("atol", atol)
        self.rtol = _check_tolerance("rtol", rtol)
        self.max_iterations = _check_count("max_iterations", max_iterations)
        self.initial_power_iterations = _check_initial_iterations(initial_power_iterations)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # Closed forms need no iteration (and the power method's one-hot duals are unstable).
        # They hold for any order on the other side, learnable or not.
        self._closed_form = _is(self.domain, 1.0) or _is(self.codomain, _INF)

    @property
    def learnable_orders(self) -> list[NormOrder]:
        """The `NormOrder`s among (domain, codomain), without repeats."""
        orders = [o for o in (self.domain, self.codomain) if isinstance(o, NormOrder)]
        return orders[:1] if len(orders) == 2 and orders[0] is orders[1] else orders

    def _orders(self, dtype: tf.DType, *, differentiable: bool = False) -> tuple[Order, Order]:
        """(p, q) as floats or scalar Tensors of `dtype` (learned ones stop the gradient)."""

        def value(order: float | NormOrder) -> Order:
            if not isinstance(order, NormOrder):
                return order
            p = tf.cast(order.order(), dtype)
            return p if differentiable else tf.stop_gradient(p)

        return value(self.domain), value(self.codomain)

    def _operator_kernel(self, kernel: tf.Tensor) -> tf.Tensor:
        return kernel

    def _build_spectral(self, op: _MatrixOperator | _ConvOperator) -> None:
        self._op = op
        if self._closed_form:
            return
        # The estimates are identical on every replica, so only the first one's are kept.
        state = dict(trainable=False, autocast=False, aggregation="only_first_replica")
        self.u = self.add_weight(shape=op.u_shape, initializer="zeros", name="u", **state)
        self.v = self.add_weight(shape=op.v_shape, initializer="random_normal", name="v", **state)
        # Start accurate, as the authors do. Not at their training tolerance 1e-3: an RMS
        # change per element is relative to entries of size 1/sqrt(n), so for convolutions
        # it stops after ~8 iterations with sigma 3-5% low. A layer first built while tracing
        # a tf.function cannot read its new variables: it starts from a random v (still a
        # valid lower bound) until `update_lipschitz` runs. `initial_power_iterations` replaces
        # the convergence by a fixed count (0: none), for models too large to converge at build.
        if tf.inside_function():
            return
        if self.initial_power_iterations is None:
            self._power_update(1e-6, 1e-6, self.max_iterations)
        elif self.initial_power_iterations > 0:
            self._power_update(None, None, self.initial_power_iterations)

    def _kernel(self) -> tf.Tensor:
        return tf.convert_to_tensor(self.kernel)

    def sigma(self) -> tf.Tensor:
        """Returns the norm estimate used by `call`, without updating anything.

            sigma = ||A v||_q / ||v||_p   (v: stored estimate; exact for closed forms)

        A lower bound on ||A||_{p->q}; at convergence it equals u^T A v. Gradients flow
        through the kernel only. Returns a scalar Tensor.
        """
        return self._sigma(self._operator_kernel(self._kernel()))

    def _sigma(self, kernel: tf.Tensor, *, differentiable_orders: bool = False) -> tf.Tensor:
        p, q = self._orders(kernel.dtype, differentiable=differentiable_orders)
        if self._closed_form:
            return _closed_form_norm(self._op, kernel, p, q)
        return self._ratio(kernel, tf.stop_gradient(tf.cast(self.v, kernel.dtype)), p, q)

    def _ratio(self, kernel: tf.Tensor, v: tf.Tensor, p: Order, q: Order) -> tf.Tensor:
        av = self._op.forward(v, kernel)
        return _lp_norm(av, q) / _safe(_lp_norm(v, p))

    def sigma_of_orders(self) -> tf.Tensor | None:
        """The norm estimate as a function of the learnable orders alone, or None without any.

            sigma(p, q) = ||A v||_q / ||v||_p   (kernel and stored v held fixed)

        At a converged v (the maximiser) its gradient in (p, q) is that of ||A||_{p->q}
        itself; closed forms are exact. `norm_order_loss` averages it over layers.
        """
        if not self.learnable_orders:
            return None
        kernel = tf.stop_gradient(self._operator_kernel(self._kernel()))
        return self._sigma(kernel, differentiable_orders=True)

    def effective_kernel(self) -> tf.Tensor:
        """Returns W_eff = W / max(1, sigma / c), the kernel `call` uses (same shape as W)."""
        scale = tf.maximum(self.sigma() / self.lipschitz_constant, 1.0)
        return self._kernel() / scale

    def update_lipschitz(
        self,
        num_iterations: int | None = None,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int | None = None,
    ) -> tf.Tensor:
        """Runs power iterations, warm-started from the stored u, v, and stores the result.

        With `atol` or `rtol`, iterates until both u and v change by less than
        `atol + rtol * max|new|` (per-element RMS), at most `max_iterations` times; else runs
        exactly `num_iterations`. Without arguments, uses the layer's own settings. Works
        eagerly and inside `tf.function` (a `tf.while_loop`).

        Returns:
            The new norm estimate sigma, a scalar Tensor (exact for closed-form orders).

        Raises:
            ValueError: If an argument is invalid, or a count is mixed with a tolerance.
        """
        if num_iterations is not None:
            if (atol, rtol, max_iterations) != (None, None, None):
                raise ValueError(
                    "pass num_iterations or atol/rtol/max_iterations, not both; got "
                    f"num_iterations={num_iterations!r}, atol={atol!r}, rtol={rtol!r}, "
                    f"max_iterations={max_iterations!r}"
                )
            count = _check_count("num_iterations", num_iterations)
            return self._power_update(None, None, count)
        if atol is None and rtol is None:
            atol, rtol = self.atol, self.rtol
        if atol is None and rtol is None and max_iterations is None:
            return self._power_update(None, None, self.num_power_iterations)
        atol = _check_tolerance("atol", atol) or 0.0
        rtol = _check_tolerance("rtol", rtol) or 0.0
        cap = self.max_iterations if max_iterations is None else max_iterations
        cap = _check_count("max_iterations", cap)
        return self._power_update(atol, rtol, cap)

    def _power_update(
        self, atol: float | None, rtol: float | None, max_iterations: int
    ) -> tf.Tensor:
        kernel = tf.stop_gradient(self._operator_kernel(self._kernel()))
        p, q = self._orders(kernel.dtype)
        if self._closed_form:
            return _closed_form_norm(self._op, kernel, p, q)
        iterate = _power_iteration(self._op, _static(p), _static(q), atol, rtol, max_iterations)
        u, v, sigma = iterate(
            kernel,
            tf.cast(self.u, kernel.dtype),
            tf.cast(self.v, kernel.dtype),
            *[order for order in (p, q) if not isinstance(order, float)],
        )
        self.u.assign(tf.cast(u, self.u.dtype))
        self.v.assign(tf.cast(v, self.v.dtype))
        return sigma

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            lipschitz_constant=self.lipschitz_constant,
            domain=_order_config(self.domain),
            codomain=_order_config(self.codomain),
            num_power_iterations=self.num_power_iterations,
            atol=self.atol,
            rtol=self.rtol,
            max_iterations=self.max_iterations,
            initial_power_iterations=self.initial_power_iterations,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_resflow")
class SpectralDense(_SpectralLayer):
    """Dense layer with ||W_eff||_{p->q} <= lipschitz_constant (soft rule, module docs).

        y = x W_eff + b,   W_eff = W / max(1, sigma / c),   W of shape [n_in, units]

    Args:
        units: Output width.
        lipschitz_constant: Bound c in (0, 1) on the operator norm ("coeff" in Chen et al.).
        domain: Order p in [1, inf] of the input norm ('inf' or float('inf') for infinity),
            or a learnable `NormOrder` (shared with the layer before, see module docs).
        codomain: Order q in [1, inf] of the output norm, or a `NormOrder`. (2, 2) is the
            spectral norm.
        num_power_iterations: Iterations per `update_lipschitz()` call without tolerances,
            i.e. per training step when the training loop updates after each step.
        atol: If set (or `rtol`), `update_lipschitz()` iterates to this absolute tolerance.
        rtol: Relative tolerance, see `atol`.
        max_iterations: Cap on iterations to a tolerance (also used once when built).
        initial_power_iterations: Iterations when the layer is built: None (default) iterates
            to a tolerance of 1e-6 (at most `max_iterations`); an integer runs exactly that
            many (0: none, for large models: sigma then starts as a lower bound from a random
            `v` until `update_lipschitz` runs).
        use_bias: Whether to add a bias b.
        kernel_initializer: Keras initializer of W.
        bias_initializer: Keras initializer of b.
        **kwargs: Passed to `keras.layers.Layer` (e.g. `name`, `dtype`).

    Input: float Tensor [..., n_in]. Output: [..., units].
    """

    def __init__(
        self,
        units: int,
        *,
        lipschitz_constant: float = 0.97,
        domain: float | str | NormOrder = 2,
        codomain: float | str | NormOrder = 2,
        num_power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int = 200,
        initial_power_iterations: int | None = None,
        use_bias: bool = True,
        kernel_initializer: object = "glorot_uniform",
        bias_initializer: object = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(
            lipschitz_constant=lipschitz_constant,
            domain=domain,
            codomain=codomain,
            num_power_iterations=num_power_iterations,
            atol=atol,
            rtol=rtol,
            max_iterations=max_iterations,
            initial_power_iterations=initial_power_iterations,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.units = _check_count("units", units)

    def build(self, input_shape: tuple) -> None:
        n_in = input_shape[-1]
        if n_in is None:
            raise ValueError(f"SpectralDense needs a known last input dimension; got {input_shape}")
        self.kernel = self.add_weight(
            shape=(n_in, self.units), initializer=self.kernel_initializer, name="kernel"
        )
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(self.units,), initializer=self.bias_initializer, name="bias"
            )
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: n_in})
        self._build_spectral(_MatrixOperator(n_in, self.units))

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> tf.Tensor:
        y = tf.matmul(x, tf.cast(self.effective_kernel(), x.dtype))
        return y + tf.cast(self.bias, y.dtype) if self.use_bias else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


def _pair(name: str, value: object) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0 for n in pair
    ):
        raise ValueError(f"{name} must be a positive int or a pair of them; got {value!r}")
    return int(pair[0]), int(pair[1])


def _output_size(size: int, k: int, s: int, padding: str) -> int:
    return -(-size // s) if padding == "same" else (size - k) // s + 1


def _covered_taps(size: int, k: int, s: int, padding: str) -> np.ndarray:
    """Which of the k taps along one axis meet the image (not only padding) at least once."""
    out = _output_size(size, k, s, padding)
    before = max((out - 1) * s + k - size, 0) // 2 if padding == "same" else 0  # TF's rule
    position = np.arange(out)[:, None] * s - before + np.arange(k)[None, :]
    return ((position >= 0) & (position < size)).any(axis=0)


@keras.saving.register_keras_serializable(package="tfp_resflow")
class SpectralConv2D(_SpectralLayer):
    """2-D convolution whose operator norm on [H, W, C_in] images is <= lipschitz_constant.

        y = conv2d(x, W_eff) + b,   W_eff = W / max(1, sigma / c),   W: [kh, kw, C_in, filters]

    sigma is the norm of the convolution operator itself (not of the reshaped kernel), at the
    spatial size fixed when the layer is built; the power method alternates `conv2d` and its
    adjoint `conv2d_transpose` with the same strides and zero padding. For 1x1 kernels the
    C_in x filters matrix is used instead, which is exact when p <= q (always for (2, 2));
    with learnable orders, which may cross, the operator is used.
    Only `channels_last` is supported.

    Args:
        filters: Output channels.
        kernel_size: Int or (kh, kw).
        strides: Int or (sh, sw).
        padding: "same" or "valid" (zero padding).
        lipschitz_constant: Bound c in (0, 1) on the operator norm.
        domain: Order p in [1, inf] of the input norm, or a learnable `NormOrder`.
        codomain: Order q in [1, inf] of the output norm, or a `NormOrder`.
        num_power_iterations: See `SpectralDense`.
        atol: See `SpectralDense`.
        rtol: See `SpectralDense`.
        max_iterations: See `SpectralDense`.
        initial_power_iterations: See `SpectralDense`.
        use_bias: Whether to add a bias.
        kernel_initializer: Keras initializer of W.
        bias_initializer: Keras initializer of b.
        **kwargs: Passed to `keras.layers.Layer`.

    Input: float Tensor [batch, H, W, C_in] with the H, W, C_in it was built with.
    Output: [batch, H', W', filters].
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        *,
        strides: int | tuple[int, int] = 1,
        padding: str = "same",
        lipschitz_constant: float = 0.97,
        domain: float | str | NormOrder = 2,
        codomain: float | str | NormOrder = 2,
        num_power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int = 200,
        initial_power_iterations: int | None = None,
        use_bias: bool = True,
        kernel_initializer: object = "glorot_uniform",
        bias_initializer: object = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(
            lipschitz_constant=lipschitz_constant,
            domain=domain,
            codomain=codomain,
            num_power_iterations=num_power_iterations,
            atol=atol,
            rtol=rtol,
            max_iterations=max_iterations,
            initial_power_iterations=initial_power_iterations,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.filters = _check_count("filters", filters)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid'; got {padding!r}")
        self.padding = padding.lower()

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 4 or any(n is None for n in input_shape[1:]):
            raise ValueError(
                "SpectralConv2D needs a full input shape [batch, height, width, channels]: the "
                f"operator norm depends on the spatial size; got {input_shape}"
            )
        _, h, w, c = input_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        out_h, out_w = _output_size(h, kh, sh, self.padding), _output_size(w, kw, sw, self.padding)
        if min(out_h, out_w) <= 0:
            raise ValueError(f"kernel_size {self.kernel_size} is larger than the input {(h, w)}")
        self.kernel = self.add_weight(
            shape=(kh, kw, c, self.filters), initializer=self.kernel_initializer, name="kernel"
        )
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(self.filters,), initializer=self.bias_initializer, name="bias"
            )
        self.input_spec = keras.InputSpec(ndim=4, axes={1: h, 2: w, 3: c})
        # A 1x1 conv is block-diagonal over pixels: its norm is the matrix's when p <= q.
        # Learned orders may cross, so they always use the operator.
        static = not self.learnable_orders
        self._use_matrix = (kh, kw) == (1, 1) and (
            self._closed_form or (static and self.domain <= self.codomain)
        )
        if self._use_matrix:
            op = _MatrixOperator(c, self.filters)
        else:
            mask = np.outer(
                _covered_taps(h, kh, sh, self.padding), _covered_taps(w, kw, sw, self.padding)
            )
            op = _ConvOperator(
                [1, h, w, c],
                [1, out_h, out_w, self.filters],
                self.strides,
                self.padding,
                mask[:, :, None, None].astype(np.float32),
            )
        self._build_spectral(op)

    def _operator_kernel(self, kernel: tf.Tensor) -> tf.Tensor:
        return tf.reshape(kernel, tf.shape(kernel)[2:]) if self._use_matrix else kernel

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> tf.Tensor:
        kernel = tf.cast(self.effective_kernel(), x.dtype)
        y = tf.nn.conv2d(x, kernel, list(self.strides), self.padding.upper())
        return y + tf.cast(self.bias, y.dtype) if self.use_bias else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        b, h, w, _ = input_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        return (
            b,
            _output_size(h, kh, sh, self.padding),
            _output_size(w, kw, sw, self.padding),
            self.filters,
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": list(self.strides),
            "padding": self.padding,
        }


def spectral_layers(layers: keras.layers.Layer | Iterable) -> list[keras.layers.Layer]:
    """Returns every `SpectralDense`/`SpectralConv2D` in a layer, model or iterable of them."""
    found = {}
    stack = [layers]
    while stack:
        item = stack.pop()
        if isinstance(item, keras.layers.Layer):
            for layer in item._flatten_layers(include_self=True, recursive=True):
                if isinstance(layer, _SpectralLayer):
                    found.setdefault(id(layer), layer)
        else:
            stack.extend(reversed(list(item)))
    return list(found.values())


def update_lipschitz(
    layers: keras.layers.Layer | Iterable,
    num_iterations: int | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_iterations: int | None = None,
) -> list[tf.Tensor]:
    """Runs `update_lipschitz` on every spectral layer found in `layers`.

    Call it after every optimizer step (e.g. with each layer's defaults) and to a tolerance
    before evaluation, e.g. `update_lipschitz(model, atol=1e-3, rtol=1e-3)`.

    Args:
        layers: A Keras layer or model, or an iterable of them, searched recursively.
        num_iterations: Fixed number of iterations (see `SpectralDense.update_lipschitz`).
        atol: Absolute tolerance on the per-element RMS change of u and v.
        rtol: Relative tolerance, times max|u| (resp. max|v|).
        max_iterations: Cap with a tolerance; defaults to each layer's `max_iterations`.

    Returns:
        The new sigma of each layer, in the order of `spectral_layers(layers)`.
    """
    return [
        layer.update_lipschitz(num_iterations, atol=atol, rtol=rtol, max_iterations=max_iterations)
        for layer in spectral_layers(layers)
    ]


def norm_order_loss(layers: keras.layers.Layer | Iterable) -> tf.Tensor | None:
    """The objective of learnable norm orders: the mean of `sigma_of_orders()` over layers.

        L(orders) = mean_l sigma_l(p_l, q_l)   (kernels and v held fixed)

    Lower norm estimates mean less rescaled kernels, so the orders adapt to the weights (Chen
    et al. minimise the same mean, after one power step). Only the `NormOrder` logits get a
    gradient. `FlowModel` adds its gradient to every training step; custom loops can add
    `loss + (L - tf.stop_gradient(L))` to leave the loss value unchanged.

    Returns:
        A scalar Tensor, or None if no layer in `layers` has a learnable order.
    """
    sigmas = [
        s for s in map(_SpectralLayer.sigma_of_orders, spectral_layers(layers)) if s is not None
    ]
    if not sigmas:
        return None
    return tf.add_n([tf.cast(s, sigmas[0].dtype) for s in sigmas]) / len(sigmas)
