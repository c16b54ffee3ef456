"""1-Lipschitz activations for residual functions g with Lip(g) < 1.

An elementwise activation with |phi'| <= 1 is 1-Lipschitz in every l_p norm, so it never
increases the bound that the Lipschitz layers enforce. Lipschitz constants:

    name        phi(x)                                         Lip
    lipswish    x * sigmoid(beta * x) / 1.1, beta learned      0.99985 (any beta > 0)
    clipswish   [lipswish(x), lipswish(-x)] / 1.004            0.99997 (l2 only; 2x width)
    elu         x if x > 0 else exp(x) - 1                     1
    softplus    log(1 + exp(x))                                1 (sup of sigmoid)
    tanh        tanh(x)                                        1
    identity    x                                              1

References:
    Chen et al. (2019), Residual Flows for Invertible Generative Modeling, Sec. 4,
    https://arxiv.org/abs/1906.02735
    Perugachi-Diaz et al. (2021), Invertible DenseNets with Concatenated LipSwish,
    https://arxiv.org/abs/2102.02694
"""

__all__ = [
    "ACTIVATIONS",
    "CLIPSWISH_SCALE",
    "LIPSWISH_SCALE",
    "CLipSwish",
    "LipSwish",
    "get_activation",
    "width_factor",
]

import math
from collections.abc import Callable

import keras
import tensorflow as tf

from tfp_resflow.core import validation

# d/dx [x * sigmoid(beta * x)] = f(beta * x) with f(t) = s(t) + t * s(t) * (1 - s(t)), s the
# sigmoid, so its range does not depend on beta > 0: it peaks at f(2.3994) = 1.099839. Dividing
# by 1.1 makes LipSwish 1-Lipschitz for every beta (derivative range [-0.0908, 0.99985]).
LIPSWISH_SCALE = 1.1

# For t -> (phi(t), phi(-t)) with phi = x * sigmoid(beta * x): phi'(-t) = 1 - phi'(t), so the
# l2 norm of its derivative, sqrt(f**2 + (1 - f)**2), peaks at 1.104362 (where f peaks);
# 1.104362 / 1.1 = 1.003965, rounded up to the 1.004 of Perugachi-Diaz et al.
CLIPSWISH_SCALE = 1.004

# beta = softplus(0.5) = 0.974, the authors' initial value.
_DEFAULT_BETA = math.log1p(math.exp(0.5))


@keras.saving.register_keras_serializable(package="tfp_resflow")
class LipSwish(keras.layers.Layer):
    """LipSwish, a smooth 1-Lipschitz activation whose derivative does not saturate at 1.

        phi(x) = x * sigmoid(beta * x) / 1.1,   beta = softplus(b),   |phi'(x)| <= 0.99985

    `b` is one trainable scalar per layer. Unlike ELU, |phi'| nears its maximum where
    phi'' != 0, so the log-det's gradient (which involves phi'') does not vanish there.

    Args:
        initial_beta: Initial beta > 0; the default softplus(0.5) = 0.974 is the authors'.
        trainable_beta: Whether b is trainable.
        **kwargs: Passed to `keras.layers.Layer`.

    Input: float Tensor of any shape; the output has the same shape.
    """

    def __init__(
        self, initial_beta: float = _DEFAULT_BETA, *, trainable_beta: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.initial_beta = validation.number("initial_beta", initial_beta, above=0)
        self.trainable_beta = trainable_beta
        # A scalar needs no input shape, so it is created here rather than in build.
        self.b = self.add_weight(
            shape=(),
            initializer=self._initial_b,
            trainable=trainable_beta,
            name="b",
        )

    def _initial_b(self, shape: tuple, dtype: str | None = None) -> tf.Tensor:
        # Inverse softplus, so that softplus(b) starts at initial_beta. (Not a Keras Constant,
        # which rounds through float32.)
        return tf.fill(shape, tf.constant(math.log(math.expm1(self.initial_beta)), dtype))

    @property
    def beta(self) -> tf.Tensor:
        """The slope softplus(b), a positive scalar Tensor."""
        return tf.nn.softplus(tf.convert_to_tensor(self.b))

    def _lipswish(self, x: tf.Tensor) -> tf.Tensor:
        return x * tf.sigmoid(tf.cast(self.beta, x.dtype) * x) / LIPSWISH_SCALE

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self._lipswish(x)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(initial_beta=self.initial_beta, trainable_beta=self.trainable_beta)
        return config


@keras.saving.register_keras_serializable(package="tfp_resflow")
class CLipSwish(LipSwish):
    """Concatenated LipSwish: doubles the last axis, 1-Lipschitz in the l2 norm.

        phi(x) = concat([lipswish(x), lipswish(-x)], axis=-1) / 1.004

    Both halves share one beta. The next layer sees twice the width. It is not 1-Lipschitz
    for other l_p norms (in l1 its constant is about 1.086), so use it with (2, 2) norms only.

    Args:
        initial_beta: See `LipSwish`.
        trainable_beta: See `LipSwish`.
        **kwargs: Passed to `keras.layers.Layer`.

    Input: float Tensor [..., n]. Output: [..., 2 * n].
    """

    def call(self, x: tf.Tensor) -> tf.Tensor:
        both = tf.concat([self._lipswish(x), self._lipswish(-x)], axis=-1)
        return both / CLIPSWISH_SCALE

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        last = input_shape[-1]
        return (*input_shape[:-1], None if last is None else 2 * last)


ACTIVATIONS: dict[str, Callable[..., keras.layers.Layer]] = {
    "lipswish": LipSwish,
    "clipswish": CLipSwish,
    "elu": lambda **kwargs: keras.layers.Activation("elu", **kwargs),
    "softplus": lambda **kwargs: keras.layers.Activation("softplus", **kwargs),
    "tanh": lambda **kwargs: keras.layers.Activation("tanh", **kwargs),
    "identity": keras.layers.Identity,
}


# How many outputs each activation gives per input: CLipSwish concatenates two.
_WIDTH_FACTORS = {"clipswish": 2}


def width_factor(name: str) -> int:
    """Outputs per input of the activation `name` (2 for CLipSwish, else 1).

    A plain lookup: configs check their widths with it when they are made, and building a layer
    there would start TensorFlow's runtime at import time (before `tf.distribute` can set up
    logical devices or collectives).

    Raises:
        ValueError: If `name` is not in `ACTIVATIONS`.
    """
    key = name.lower() if isinstance(name, str) else name
    return _WIDTH_FACTORS.get(validation.choice("activation", key, tuple(ACTIVATIONS)), 1)


def get_activation(name: str, /, **kwargs) -> keras.layers.Layer:
    """Returns a new 1-Lipschitz activation layer (see the module table for each constant).

    Args:
        name: One of `ACTIVATIONS` (case-insensitive).
        **kwargs: Passed to the layer (e.g. `dtype`, or its `name`).

    Raises:
        ValueError: If `name` is not in `ACTIVATIONS`.
    """
    key = name.lower() if isinstance(name, str) else name
    return ACTIVATIONS[validation.choice("activation", key, tuple(ACTIVATIONS))](**kwargs)
