"""`SpectralLayer`, the base of the Lipschitz layers: soft rescaling and power iterations.

A subclass applies a linear operator A with kernel W; this class keeps its norm estimate and
rescales the kernel, as described in `tfp_resflow.layers.lipschitz`:

    W_eff = W / max(1, sigma / c),   sigma ~= ||A||_{p->q}   (`tfp_resflow.layers.operator_norm`)

`lipschitz_estimate` says where sigma comes from:
- "power" (default, the authors'): the power method's estimate, a lower bound. Its vectors
  `u`, `v` are non-trainable weights, converged when the layer is built and updated only by
  `update_lipschitz`; `call` reads them and never iterates.
- "gram": the Gram iteration's upper bound (`tfp_resflow.layers.gram_iteration`), recomputed from
  the kernel in every call and differentiated through, so ||W_eff|| <= c holds at every step by
  construction (up to the float rounding of the layer's dtype). (2, 2) norms only; no state.
Closed forms (p = 1 or q = inf) are exact either way.
"""

__all__ = ["SpectralLayer", "effective_kernels_given"]

import contextlib
import threading
from collections.abc import Iterator

import keras
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.gram_iteration import gram_spectral_bound
from tfp_resflow.layers.norm_order import NormOrder, check_order_spec, order_config
from tfp_resflow.layers.operator_norm import (
    Operator,
    Order,
    closed_form_norm,
    has_closed_form,
    norm_ratio,
    power_method,
)

LIPSCHITZ_ESTIMATES = ("power", "gram")
# Gram steps when the bound normalises a layer: it exceeds the norm by at most
# rank**(2**-(steps + 1)), 1.012 for rank 512 at 8 steps.
TRAINING_GRAM_ITERATIONS = 8


_KERNELS_GIVEN = threading.local()


@contextlib.contextmanager
def effective_kernels_given() -> Iterator[None]:
    """Within it, `effective_kernel()` is the kernel as given, with no rescaling.

    For a caller that has put every layer's effective kernel W_eff in place of its kernel
    (`BlockFunctions`' solve computes them once, outside the fixed-point loop, instead of in
    every evaluation of g). It acts when a function is traced or run eagerly in it.
    """
    previous = getattr(_KERNELS_GIVEN, "active", False)
    _KERNELS_GIVEN.active = True
    try:
        yield
    finally:
        _KERNELS_GIVEN.active = previous


def _tolerance(name: str, value: object) -> float | None:
    """A tolerance: None, or a number >= 0."""
    return validation.optional(validation.number, name, value, at_least=0)


class SpectralLayer(keras.layers.Layer):
    """The base of `SpectralDense` and `SpectralConv2D`: norm estimate, rescaling, iteration.

    Its keyword arguments, and their defaults, are those of `SpectralDense` after `units`.
    Subclasses create `kernel` (and `bias`) in `build`, then call `_build_spectral(op)` with
    the `operator_norm.Operator` of the kernel.
    """

    def __init__(
        self,
        *,
        lipschitz_constant: float = 0.97,
        domain: float | str | NormOrder = 2,
        codomain: float | str | NormOrder = 2,
        power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int = 200,
        initial_power_iterations: int | None = None,
        use_bias: bool = True,
        kernel_initializer: object = "glorot_uniform",
        bias_initializer: object = "zeros",
        lipschitz_estimate: str = "power",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.lipschitz_constant = validation.number(
            "lipschitz_constant", lipschitz_constant, above=0, below=1
        )
        self.domain = check_order_spec("domain", domain)
        self.codomain = check_order_spec("codomain", codomain)
        self.power_iterations = validation.positive_integer("power_iterations", power_iterations)
        self.atol = _tolerance("atol", atol)
        self.rtol = _tolerance("rtol", rtol)
        self.max_iterations = validation.positive_integer("max_iterations", max_iterations)
        self.initial_power_iterations = validation.optional(
            validation.integer, "initial_power_iterations", initial_power_iterations, 0
        )
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # Closed forms need no iteration (and the power method's one-hot duals are unstable).
        # They hold for any order on the other side, learnable or not.
        self._closed_form = has_closed_form(self.domain, self.codomain)
        self.lipschitz_estimate = validation.choice(
            "lipschitz_estimate", lipschitz_estimate, LIPSCHITZ_ESTIMATES
        )
        two = {self.domain, self.codomain} == {2.0}
        if self.lipschitz_estimate == "gram" and not (self._closed_form or two):
            raise ValueError(
                "lipschitz_estimate='gram' bounds (2, 2) norms (closed forms need no estimate); "
                f"got domain={domain!r}, codomain={codomain!r}"
            )
        self._gram = self.lipschitz_estimate == "gram" and not self._closed_form

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

    def _build_spectral(self, op: Operator) -> None:
        self._op = op
        if self._closed_form or self._gram:
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
            return closed_form_norm(self._op, kernel, p, q)
        if self._gram:
            return self.gram_norm_bound(kernel, TRAINING_GRAM_ITERATIONS)
        v = tf.stop_gradient(tf.cast(self.v, kernel.dtype))
        return norm_ratio(self._op, kernel, v, p, q)

    def gram_norm_bound(self, kernel: tf.Tensor, iterations: int) -> tf.Tensor:
        """An upper bound on the (2, 2) norm of this layer's operator with `kernel`.

        `kernel` is its operator's kernel (`_operator_kernel` applied); the Gram iteration on
        `Operator.gram_matrices`, differentiable.
        """
        return tf.reduce_max(gram_spectral_bound(self._op.gram_matrices(kernel), iterations))

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
        """Returns W_eff = W / max(1, sigma / c), the kernel `call` uses (same shape as W).

        Within `effective_kernels_given()`, the kernel as it is (it holds W_eff already).
        """
        if getattr(_KERNELS_GIVEN, "active", False):
            return self._kernel()
        scale = tf.maximum(self.sigma() / self.lipschitz_constant, 1.0)
        return self._kernel() / scale

    def update_lipschitz(
        self,
        power_iterations: int | None = None,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int | None = None,
    ) -> tf.Tensor:
        """Runs power iterations, warm-started from the stored u, v, and stores the result.

        With `atol` or `rtol`, iterates until both u and v change by less than
        `atol + rtol * max|new|` (per-element RMS), at most `max_iterations` times; else runs
        exactly `power_iterations`. Without arguments, uses the layer's own settings. Works
        eagerly and inside `tf.function` (a `tf.while_loop`).

        Returns:
            The new norm estimate sigma, a scalar Tensor (exact for closed-form orders).

        Raises:
            ValueError: If an argument is invalid, or a count is mixed with a tolerance.
        """
        if power_iterations is not None:
            if (atol, rtol, max_iterations) != (None, None, None):
                raise ValueError(
                    "pass power_iterations or atol/rtol/max_iterations, not both; got "
                    f"power_iterations={power_iterations!r}, atol={atol!r}, rtol={rtol!r}, "
                    f"max_iterations={max_iterations!r}"
                )
            count = validation.positive_integer("power_iterations", power_iterations)
            return self._power_update(None, None, count)
        if atol is None and rtol is None:
            atol, rtol = self.atol, self.rtol
        if atol is None and rtol is None and max_iterations is None:
            return self._power_update(None, None, self.power_iterations)
        atol = _tolerance("atol", atol) or 0.0
        rtol = _tolerance("rtol", rtol) or 0.0
        cap = self.max_iterations if max_iterations is None else max_iterations
        cap = validation.positive_integer("max_iterations", cap)
        return self._power_update(atol, rtol, cap)

    def _power_update(
        self, atol: float | None, rtol: float | None, max_iterations: int
    ) -> tf.Tensor:
        kernel = tf.stop_gradient(self._operator_kernel(self._kernel()))
        p, q = self._orders(kernel.dtype)
        if self._closed_form:
            return closed_form_norm(self._op, kernel, p, q)
        if self._gram:  # nothing to iterate: the bound is computed in every call
            return self.gram_norm_bound(kernel, TRAINING_GRAM_ITERATIONS)
        u, v = tf.cast(self.u, kernel.dtype), tf.cast(self.v, kernel.dtype)
        u, v, sigma = power_method(
            self._op, kernel, u, v, p, q, atol=atol, rtol=rtol, max_iterations=max_iterations
        )
        self.u.assign(tf.cast(u, self.u.dtype))
        self.v.assign(tf.cast(v, self.v.dtype))
        return sigma

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            lipschitz_constant=self.lipschitz_constant,
            domain=order_config(self.domain),
            codomain=order_config(self.codomain),
            power_iterations=self.power_iterations,
            atol=self.atol,
            rtol=self.rtol,
            max_iterations=self.max_iterations,
            initial_power_iterations=self.initial_power_iterations,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            lipschitz_estimate=self.lipschitz_estimate,
        )
        return config
