"""Lipschitz-constrained Keras layers: soft normalisation by an induced operator norm.

Each layer applies a linear operator `A` (a dense map here, a convolution in
`tfp_resflow.layers.spectral_conv`) and rescales its kernel so that the operator norm from `l_p`
(domain) to `l_q` (codomain) is at most `c`:

    W_eff = W / max(1, sigma / c),   sigma ~= ||A||_{p->q} = max{ ||A v||_q / ||v||_p }

so a kernel already inside the bound is used unchanged, and the kernel variable itself is
never overwritten. `sigma` comes from a closed form when one exists (p = 1 or q = inf) and
otherwise from the generalized power method, whose estimates `u`, `v` are non-trainable
weights (the math: `tfp_resflow.layers.operator_norm`).

Orders are numbers, fixed at construction, or learnable `NormOrder`s
(`tfp_resflow.layers.norm_order`) in (1, 5), shared between consecutive layers. `call` and the power
iterations read a learnable order without a gradient; `norm_order_loss` gives the orders their own
objective, the mean of the layers' norm estimates with the kernels and `v` held fixed (at a
converged `v` its gradient is that of the true norm: `v` maximises the ratio, so its own change
does not count).

`call` never iterates (it is pure, so it can run inside nested tapes, loops and XLA). The
power iterations run only in `update_lipschitz`, which the training loop calls after every
optimizer step, and to a tolerance before evaluation, as the authors do. An unconverged
`sigma` underestimates the true norm, so the bound holds only after enough iterations. Outside
the closed forms and (2, 2) the power method may also settle on a local maximum (computing such
norms is NP-hard in general), so there the bound is only as good as the estimate.

References:
    Chen et al. (2019), Residual Flows for Invertible Generative Modeling, Sec. 3.2 and D,
    https://arxiv.org/abs/1906.02735
    Gouk et al. (2021), Regularisation of neural networks by enforcing Lipschitz continuity,
    https://arxiv.org/abs/1804.04368
"""

__all__ = [
    "SpectralConv2D",
    "SpectralDense",
    "norm_order_loss",
    "spectral_layers",
    "update_lipschitz",
]

from collections.abc import Iterable

import keras
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.operator_norm import MatrixOperator
from tfp_resflow.layers.spectral_conv import SpectralConv2D
from tfp_resflow.layers.spectral_layer import SpectralLayer


@keras.saving.register_keras_serializable(package="tfp_resflow")
class SpectralDense(SpectralLayer):
    """Dense layer with ||W_eff||_{p->q} <= lipschitz_constant (soft rule, module docs).

        y = x W_eff + b,   W_eff = W / max(1, sigma / c),   W of shape [n_in, units]

    Args:
        units: Output width.
        **kwargs: The keyword arguments below, then those of `keras.layers.Layer` (e.g.
            `name`, `dtype`).

    Keyword Args:
        lipschitz_constant: Bound c in (0, 1) on the operator norm ("coeff" in Chen et al.);
            0.97 by default.
        domain: Order p in [1, inf] of the input norm ('inf' or float('inf') for infinity),
            or a learnable `NormOrder` (shared with the layer before, see module docs); 2.
        codomain: Order q in [1, inf] of the output norm, or a `NormOrder`; 2. (2, 2) is the
            spectral norm.
        power_iterations: Iterations per `update_lipschitz()` call without tolerances,
            i.e. per training step when the training loop updates after each step; 5.
        atol: If set (or `rtol`), `update_lipschitz()` iterates to this absolute tolerance;
            None.
        rtol: Relative tolerance, see `atol`; None.
        max_iterations: Cap on iterations to a tolerance (also used once when built); 200.
        initial_power_iterations: Iterations when the layer is built: None (default) iterates
            to a tolerance of 1e-6 (at most `max_iterations`); an integer runs exactly that
            many (0: none, for large models: sigma then starts as a lower bound from a random
            `v` until `update_lipschitz` runs).
        use_bias: Whether to add a bias b; True.
        kernel_initializer: Keras initializer of W; "glorot_uniform".
        bias_initializer: Keras initializer of b; "zeros".
        lipschitz_estimate: sigma from the power method ("power", the default: a lower bound,
            see above) or the Gram iteration's upper bound ("gram": recomputed in every call,
            so the bound holds at every step; (2, 2) norms only; `spectral_layer`).

    Input: float Tensor [..., n_in]. Output: [..., units].
    """

    def __init__(self, units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units = validation.positive_integer("units", units)

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
        self._build_spectral(MatrixOperator(n_in, self.units))

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> tf.Tensor:
        y = tf.matmul(x, tf.cast(self.effective_kernel(), x.dtype))
        return y + tf.cast(self.bias, y.dtype) if self.use_bias else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


def spectral_layers(layers: keras.layers.Layer | Iterable) -> list[keras.layers.Layer]:
    """Returns every `SpectralDense`/`SpectralConv2D` in a layer, model or iterable of them."""
    found = {}
    stack = [layers]
    while stack:
        item = stack.pop()
        if isinstance(item, keras.layers.Layer):
            for layer in item._flatten_layers(include_self=True, recursive=True):
                if isinstance(layer, SpectralLayer):
                    found.setdefault(id(layer), layer)
        else:
            stack.extend(reversed(list(item)))
    return list(found.values())


def update_lipschitz(
    layers: keras.layers.Layer | Iterable,
    power_iterations: int | None = None,
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
        power_iterations: Fixed number of iterations (see `SpectralDense.update_lipschitz`).
        atol: Absolute tolerance on the per-element RMS change of u and v.
        rtol: Relative tolerance, times max|u| (resp. max|v|).
        max_iterations: Cap with a tolerance; defaults to each layer's `max_iterations`.

    Returns:
        The new sigma of each layer, in the order of `spectral_layers(layers)`.
    """
    return [
        layer.update_lipschitz(
            power_iterations, atol=atol, rtol=rtol, max_iterations=max_iterations
        )
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
        s for s in map(SpectralLayer.sigma_of_orders, spectral_layers(layers)) if s is not None
    ]
    if not sigmas:
        return None
    return tf.add_n([tf.cast(s, sigmas[0].dtype) for s in sigmas]) / len(sigmas)
