"""Certified invertibility: guaranteed upper bounds on Lip(g) for every residual block.

A residual block `y = x + g(x)` is invertible, and its fixed-point inverse and log-det series
converge, when `Lip(g) < 1`. The Lipschitz layers rescale their kernels by a power-iteration
estimate (`tfp_resflow.layers.lipschitz`), which approaches each layer's norm from below: an
unconverged or locally stuck estimate lets a layer exceed its constant. `certify` bounds the
map the layers actually apply (the effective kernels, after that rescaling), from above:

    Lip(g) <= prod_layers B(layer),   B(layer) >= ||layer||  guaranteed,

the product over g's path from its input x to its output (context networks only shift it:
`x -> L x + s(c)` has the norm of `L` for every c). Per layer, in float64:
- dense kernels, (2, 2): the Gram iteration on the kernel (`tfp_resflow.layers.gram_iteration`);
- convolutions, (2, 2): the Gram iteration on the explicit operator matrix on the image size
  the layer is built for (zero padding and strides included) when it has at most
  `gram_iteration.EXPLICIT_OPERATOR_ENTRIES` entries, else the circular-convolution bound on
  the image enlarged by the kernel (a few percent above the exact norm on 7x7 images, 0.1% on
  28x28);
  1x1 convolutions: their channel matrix (exact);
- p = 1 or q = inf: the exact closed forms (`operator_norm.closed_form_norm`);
- other mixed norms, and learnable orders: no guaranteed bound is known to us (the power method
  may stop at a local maximum), so the bound is `math.inf` and a `CertificationWarning` says why.
Activations contribute their Lipschitz constants: 1 for LipSwish (its maximal slope is
1.0998 / 1.1 for every beta), ELU, tanh, softplus, ReLU and the identity in every l_p;
CLipSwish 1 in l2 (its 1/1.004 scale is the maximal gain of the concatenation, found
numerically by Perugachi-Diaz et al. and checked in `tests/layers/test_activation.py`). An
i-DenseNet layer `concat([eta_1 x, eta_2 phi(W x)])` contributes `sqrt(eta_1**2 + (eta_2 Lip(phi)
B(W))**2)` (`tfp_resflow.layers.dense_network`). Reshapes, flattening and the addition of a context
shift: 1. Any other layer on the path makes the bound `math.inf`, with the reason.

The bounds are computed in NumPy float64 (`gram_iteration.gram_spectral_bound_numpy`; the
operator matrices come from TensorFlow), and each layer's bound is widened by
`gram_iteration.ROUNDING_MARGIN` for float64 rounding. The map certified is the real-number map
of the effective kernels in the layers' own dtype; the rounding of the layers' arithmetic is
outside it.
"""

__all__ = [
    "CertificationWarning",
    "certify",
    "layer_bound",
    "residual_function_bound",
    "uncertified_blocks",
]

import math
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.residual_block import ResidualBlock
from tfp_resflow.core.context import CHAIN_TYPES, INVERT_TYPES
from tfp_resflow.layers.activation import CLipSwish, LipSwish
from tfp_resflow.layers.dense_network import LipschitzDenseLayer
from tfp_resflow.layers.gram_iteration import ROUNDING_MARGIN, gram_spectral_bound_numpy
from tfp_resflow.layers.norm_order import NormOrder
from tfp_resflow.layers.operator_norm import closed_form_norm, has_closed_form
from tfp_resflow.layers.spectral_layer import SpectralLayer

tfb = tfp.bijectors

# Gram steps: the bound exceeds the norm by at most rank**(2**-(steps + 1)), 1.0016 for rank
# 4096 at 12 steps; a step costs one product of the smaller side's square.
GRAM_ITERATIONS = 12

# Keras activation functions that are 1-Lipschitz in every l_p (elementwise, |phi'| <= 1).
_ONE_LIPSCHITZ_ACTIVATIONS = {"elu", "tanh", "softplus", "relu", "linear", "leaky_relu"}
# Layers on the path that move entries (norm-preserving in every l_p) or add a constant (the
# context shift of a conditional g), and the input.
_LIPSCHITZ_ONE = (
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Identity,
    keras.layers.Add,
    keras.layers.InputLayer,
)


class CertificationWarning(UserWarning):
    """A bound that is not finite (with the reason), or a block not certified below 1."""


class _Uncertified(Exception):
    """Raised inside the walk; `certify` turns it into `math.inf` and a warning."""


def _order(order: object, what: str) -> float:
    if isinstance(order, NormOrder):
        raise _Uncertified(f"{what} has a learnable norm order (no guaranteed bound known)")
    return float(order)


def _spectral_bound(layer: SpectralLayer) -> float:
    """A guaranteed bound on the l_p -> l_q norm of the map the layer applies.

    Widened by `ROUNDING_MARGIN` for float64 rounding.
    """
    return _unwidened_bound(layer) * (1.0 + ROUNDING_MARGIN)


def _unwidened_bound(layer: SpectralLayer) -> float:
    p = _order(layer.domain, layer.name)
    q = _order(layer.codomain, layer.name)
    # The effective kernel in the layer's own dtype, as `call` computes it: the map certified.
    native = layer._operator_kernel(tf.stop_gradient(layer.effective_kernel()))  # noqa: SLF001
    kernel = tf.cast(native, tf.float64)  # exact
    if has_closed_form(p, q):
        return float(closed_form_norm(layer._op, kernel, p, q))  # noqa: SLF001
    if (p, q) != (2.0, 2.0):
        raise _Uncertified(
            f"{layer.name}: no guaranteed bound for the mixed ({p:g}, {q:g}) norm (the power "
            "method may stop at a local maximum)"
        )
    # An explicit operator matrix holds copies of the kernel's entries (each impulse response
    # is one tap times 1), exact in the layer's dtype and much faster there than in float64;
    # the circular bound's Fourier transform is not exact, so it is taken in float64.
    matrices = layer._op.gram_matrices(native)  # noqa: SLF001
    if matrices.dtype.is_complex:
        matrices = layer._op.gram_matrices(kernel)  # noqa: SLF001
    matrices = matrices.numpy().astype(np.complex128 if matrices.dtype.is_complex else np.float64)
    return float(np.max(gram_spectral_bound_numpy(matrices, GRAM_ITERATIONS)))


def layer_bound(layer: keras.layers.Layer) -> float:
    """A guaranteed upper bound on the norm of the map a Lipschitz layer applies.

    The layer is a `SpectralDense` or `SpectralConv2D`; the map is its effective kernel, in its
    domain and codomain norms. `math.inf`, with a `CertificationWarning`, where no bound is
    known (module docs).
    """
    if not isinstance(layer, SpectralLayer):
        raise TypeError(f"layer_bound takes a SpectralDense or SpectralConv2D; got {layer!r}")
    try:
        return _spectral_bound(layer)
    except _Uncertified as reason:
        warnings.warn(f"not certified: {reason}", CertificationWarning, stacklevel=2)
        return math.inf


# -- the path of x through g ------------------------------------------------------------------


def _activation_constant(layer: keras.layers.Layer, order: float | None) -> float:
    if isinstance(layer, CLipSwish):
        if order not in (None, 2.0):
            raise _Uncertified(f"{layer.name}: CLipSwish is 1-Lipschitz in l2 only")
        return 1.0
    if isinstance(layer, LipSwish):
        return 1.0
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", str(layer.activation))
        if name in _ONE_LIPSCHITZ_ACTIVATIONS:
            return 1.0
        raise _Uncertified(f"{layer.name}: no known Lipschitz constant for activation {name!r}")
    raise _Uncertified(f"{layer.name}: no certified bound for a {type(layer).__name__}")


class _Chain:
    """The running product along the path, and the norm order the path is in."""

    def __init__(self) -> None:
        self.bound = 1.0
        self.order: float | None = None  # fixed by the first linear layer

    def enter(self, order: float, name: str) -> None:
        if self.order is not None and order != self.order:
            raise _Uncertified(
                f"{name}: its domain order {order:g} is not the order {self.order:g} of the "
                "layer before"
            )

    def apply(self, layer: keras.layers.Layer, inputs_on_path: int) -> None:
        if inputs_on_path > 1:
            raise _Uncertified(f"{layer.name}: joins {inputs_on_path} branches of x")
        if isinstance(layer, SpectralLayer):
            p = _order(layer.domain, layer.name)
            self.enter(p, layer.name)
            self.bound *= _spectral_bound(layer)
            self.order = _order(layer.codomain, layer.name)
        elif isinstance(layer, LipschitzDenseLayer):
            self.enter(2.0, layer.name)
            linear = layer.linear
            orders = (_order(linear.domain, linear.name), _order(linear.codomain, linear.name))
            if orders != (2.0, 2.0):
                raise _Uncertified(f"{layer.name}: the concatenation's bound needs l2 norms")
            inner = _spectral_bound(linear)
            inner *= _activation_constant(layer.activation, 2.0)
            eta = np.asarray(tf.cast(layer.concatenation_weights(), tf.float64))
            self.bound *= math.hypot(eta[0], eta[1] * inner) * (1.0 + ROUNDING_MARGIN)
            self.order = 2.0
        elif isinstance(layer, _LIPSCHITZ_ONE):
            pass  # entries moved, or a constant (context shift) added
        else:
            self.bound *= _activation_constant(layer, self.order)


def _path_layers(g: keras.Model) -> list[tuple[keras.layers.Layer, int]]:
    """`(layer, inputs on the path)` for the layers on the path of g's first input, in order."""
    if isinstance(g, keras.Sequential):
        return [(layer, 1) for layer in g.layers]
    on_path = {id(g.inputs[0])}
    path = []
    for layer in g.layers:
        for node in layer._inbound_nodes:  # noqa: SLF001 (Keras 3 keeps the graph here)
            count = sum(id(t) in on_path for t in node.input_tensors)
            if isinstance(layer, keras.layers.InputLayer):
                count = int(any(id(t) in on_path for t in node.output_tensors))
            if count:
                path.append((layer, count))
                on_path.update(id(t) for t in node.output_tensors)
    return path


def _function_bound(g: object) -> float:
    if isinstance(g, keras.Model):
        chain = _Chain()
        for layer, count in _path_layers(g):
            chain.apply(layer, count)
        return chain.bound
    if isinstance(g, keras.layers.Layer):
        chain = _Chain()
        chain.apply(g, 1)
        return chain.bound
    raise _Uncertified(f"g is not a Keras layer or model: {g!r}")


def residual_function_bound(g: object) -> float:
    """A guaranteed upper bound on `Lip(g)` in its norm (module docs).

    For a conditional g, on `Lip_x` for every context. `math.inf`, with a
    `CertificationWarning`, where no bound is known.
    """
    try:
        return _function_bound(g)
    except _Uncertified as reason:
        warnings.warn(f"not certified: {reason}", CertificationWarning, stacklevel=2)
        return math.inf


# -- blocks of a flow -------------------------------------------------------------------------


def _residual_blocks(obj: Any) -> list[ResidualBlock]:
    """The residual blocks of a bijector, in data -> latent order."""
    if isinstance(obj, ResidualBlock):
        return [obj]
    if isinstance(obj, INVERT_TYPES):
        return _residual_blocks(obj.bijector)
    if isinstance(obj, CHAIN_TYPES):  # members apply last to first: data -> latent is reversed
        return [b for member in reversed(obj.bijectors) for b in _residual_blocks(member)]
    steps = getattr(obj, "_bijector_steps", None)
    if callable(steps):  # a StackedBijector (the flows of this package)
        return [b for step in steps() for b in _residual_blocks(step.bijector)]
    return []


def uncertified_blocks(bounds: list[float]) -> list[int]:
    """The indices of the blocks whose certified bound is not below 1."""
    return [i for i, bound in enumerate(bounds) if not bound < 1.0]


def certify(obj: Any) -> float | list[float]:
    """Guaranteed upper bounds on Lipschitz constants (module docs), as Python floats.

    Args:
        obj: A `SpectralDense` or `SpectralConv2D` (the bound on its norm), a residual
            function g (on `Lip(g)`), or a bijector of this package, a `tfb.Chain` or
            `tfb.Invert` of them, or a `FlowModel` (one bound per residual block, in
            data -> latent order).

    Returns:
        A float, or a list of floats (empty for a flow without residual blocks); `math.inf`
        where no bound is known (with a
        `CertificationWarning` giving the reason). For a list, a `CertificationWarning` names
        the blocks not certified below 1.

    Raises:
        TypeError: For an object that is neither a Keras layer nor a bijector or flow model.
    """
    if isinstance(obj, SpectralLayer):
        return layer_bound(obj)
    flow = getattr(obj, "bijector", None) if isinstance(obj, keras.Model) else None
    flow = flow if isinstance(flow, tfb.Bijector) else obj
    if not isinstance(flow, tfb.Bijector):
        if isinstance(obj, keras.layers.Layer):
            return residual_function_bound(obj)
        raise TypeError(f"certify takes a Keras layer, a bijector or a FlowModel; got {obj!r}")
    blocks = _residual_blocks(flow)
    bounds = []
    for i, block in enumerate(blocks):
        try:
            bounds.append(_function_bound(block.residual_fn))
        except _Uncertified as reason:
            warnings.warn(f"block {i} not certified: {reason}", CertificationWarning, stacklevel=2)
            bounds.append(math.inf)
    failing = uncertified_blocks(bounds)
    if failing:
        worst = max(bounds[i] for i in failing)
        warnings.warn(
            f"{len(failing)} of {len(bounds)} residual blocks are not certified below 1 "
            f"(blocks {failing}; largest bound {worst:.4g}): their inverse and log-det series "
            "may not converge",
            CertificationWarning,
            stacklevel=2,
        )
    return bounds
