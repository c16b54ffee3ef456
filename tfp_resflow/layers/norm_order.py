"""`NormOrder`: a learnable order p in (1, 5) of an l_p norm, for induced mixed norms.

A Lipschitz layer may bound its operator norm from l_p to l_q for any orders; with learnable
orders (the authors' `--learn-p`), each order is one trainable scalar t mapped into (1, 5) by

    p(t) = 3 + 2 tanh(-leaky_elu(atanh(1/2) - t)),   leaky_elu(x) = 0.3 x + 0.7 elu(x)

so t = 0 gives p = 2 (the spectral norm), p rises towards 5 as t grows (slowly: there the
leaky ELU is in its flat part) and falls towards 1 as t shrinks. The orders never reach 1 or
infinity, so the generalized power method needs no one-hot special cases.

Orders are shared between layers: the codomain of one linear layer of `g` is the domain of the
next, and the last codomain is the first domain, so `g` maps an l_p space to itself
(`network.lipschitz_mlp(..., learnable_norm_orders=True)` builds this). The orders are trained
to minimise the mean norm estimate of the layers that use them (`lipschitz.norm_order_loss`),
as Chen et al. do; the likelihood gradient does not reach them.

Reference: Chen et al. (2019), Residual Flows for Invertible Generative Modeling, App. D,
https://arxiv.org/abs/1906.02735; the map is the authors' `asym_squash`.
"""

__all__ = [
    "MAX_ORDER",
    "MIN_ORDER",
    "NormOrder",
    "check_order_spec",
    "logit_of_order",
    "order_config",
    "order_of_logit",
]

import math

import keras
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.operator_norm import check_order

MIN_ORDER, MAX_ORDER = 1.0, 5.0
_SHIFT = math.atanh(0.5)  # puts p(0) = 2


def _leaky_elu(x: tf.Tensor) -> tf.Tensor:
    return 0.3 * x + 0.7 * tf.nn.elu(x)


def order_of_logit(t: tf.Tensor) -> tf.Tensor:
    """p(t) = 3 + 2 tanh(-leaky_elu(atanh(1/2) - t)), in (1, 5), increasing; p(0) = 2."""
    return 3.0 + 2.0 * tf.tanh(-_leaky_elu(_SHIFT - t))


def logit_of_order(order: float) -> float:
    """The t with `order_of_logit(t) = order`, for an order in (1, 5) (Python floats)."""
    validation.number("a learnable order", order, above=MIN_ORDER, below=MAX_ORDER)
    y = -math.atanh((order - 3.0) / 2.0)  # leaky_elu(_SHIFT - t) = y
    x = y
    if y < 0:  # invert 0.3 x + 0.7 (exp(x) - 1) = y: Newton from x = 0 (convex, increasing)
        x = 0.0
        for _ in range(100):
            step = (0.3 * x + 0.7 * math.expm1(x) - y) / (0.3 + 0.7 * math.exp(x))
            x -= step
            if abs(step) < 1e-15:
                break
    return _SHIFT - x


@keras.saving.register_keras_serializable(package="tfp_resflow")
class NormOrder(keras.layers.Layer):
    """A learnable norm order p = `order_of_logit(t)` in (1, 5), t a trainable scalar.

    Pass the same instance as the `codomain` of one `SpectralDense`/`SpectralConv2D` and the
    `domain` of the next to tie them. `.keras` files keep such ties (Keras shares objects seen
    twice while saving); rebuilding layers one by one from their `get_config` (as
    `Sequential.from_config` and `keras.models.clone_model` do) gives each its own copy.

    Args:
        initial_order: p at the start, in (1, 5); 2 (t = 0) by default, as the authors.
        **kwargs: passed to `keras.layers.Layer` (e.g. `name`, `dtype`).
    """

    def __init__(self, initial_order: float = 2.0, **kwargs) -> None:
        logit = logit_of_order(initial_order)  # checks the order first
        super().__init__(**kwargs)
        self.initial_order = float(initial_order)
        # Created here, not in build(): the layer takes no input, its owners read it directly.
        self.logit = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(logit), name="logit"
        )
        self.built = True

    def order(self) -> tf.Tensor:
        """The current order p, a scalar Tensor differentiable in the logit."""
        return order_of_logit(tf.convert_to_tensor(self.logit))

    def call(self, inputs: object = None) -> tf.Tensor:
        """Returns `order()` (the layer takes no input)."""
        del inputs
        return self.order()

    def get_config(self) -> dict:
        return {**super().get_config(), "initial_order": self.initial_order}


def check_order_spec(name: str, value: object) -> float | NormOrder:
    """A layer's order: a fixed one (`operator_norm.check_order`) or a learnable `NormOrder`.

    A `NormOrder` may also be given as its serialized config (`order_config`).
    """
    if isinstance(value, dict):
        value = keras.saving.deserialize_keras_object(value)
    if isinstance(value, NormOrder):
        return value
    return check_order(name, value)


def order_config(order: float | NormOrder) -> object:
    """A layer order as a JSON-ready config: a number, "inf", or a `NormOrder`'s config."""
    if isinstance(order, NormOrder):
        # Every occurrence carries the object's id, so that Keras' object sharing (active
        # while saving and loading .keras files) restores one NormOrder for each tie. Keras
        # marks only repeats, on a dict that the enclosing serialization then copies: lost.
        config = keras.saving.serialize_keras_object(order)
        return {**config, "shared_object_id": id(order)}
    return "inf" if order == math.inf else order  # not float('inf'), which JSON cannot hold
