"""Densely connected residual functions g with Lip(g) <= c: the i-DenseNet block.

Perugachi-Diaz, Tomczak, Bhulai (2021) replace the residual function of a Residual Flow by a
DenseNet block: each dense layer appends new features to everything computed so far,

    h_i(x) = concat([eta_1 * x, eta_2 * phi(W_i x + b_i)], axis=-1)     [.., n] -> [.., n + k]
    g      = W_out o h_n o ... o h_1 [o P]                                [.., D] -> [.., D]

with `phi` a 1-Lipschitz activation, `W_i` a Lipschitz linear layer (dense or convolution) with
norm <= c and `k` the growth (the features `phi` returns: CLipSwish doubles the `k / 2` outputs of
`W_i`). `W_out` (a 1x1 convolution for images) maps back to D features with norm <= c. The fully
connected g at the end of an image flow starts with a linear projection `P` (norm <= c, no
activation) of the wide flattened input to a few features, as in the authors' code.

The learnable concatenation (`LipschitzDenseLayer`): two trainable logits `k_1, k_2` (starting
at 1) give

    eta_j = c * e_j / sqrt(e_1**2 + e_2**2),   e_j = softplus(k_j) + 0.1,

so eta_1**2 + eta_2**2 = c**2 whatever the logits (the 0.1 keeps both parts in use).

Bound (l2 norms throughout). For x, y and d = x - y, the two parts of h(x) - h(y) are
orthogonal blocks, so

    ||h(x) - h(y)||**2 = eta_1**2 ||d||**2 + eta_2**2 ||phi(Wx + b) - phi(Wy + b)||**2
                       <= eta_1**2 ||d||**2 + eta_2**2 Lip(phi)**2 ||W||**2 ||d||**2
                       <= (eta_1**2 + eta_2**2 c**2) ||d||**2 <= c**2 ||d||**2,

(the last step: c < 1 and eta_1**2 + eta_2**2 = c**2), i.e. Lip(h_i) <= c, and by the chain
rule Lip(g) <= c * c**n [* c] <= c (the tests check c**(n+1) numerically). Without the
normalisation, eta_1 = e_1 alone can exceed 1 and the bound fails. The bound holds once the
layers' norm estimates have converged (`tfp_resflow.layers.lipschitz.update_lipschitz`). It needs
the l2 norm at every concatenation (so no mixed `norm_orders` here); CLipSwish is 1-Lipschitz in l2.

The authors scale the concatenation by a separate `lip_coeff`, 0.98 by default, equal to their
`coeff`; here both are `lipschitz_constant`.

Reference:
    Perugachi-Diaz, Tomczak, Bhulai (2021). Invertible DenseNets with Concatenated LipSwish.
    NeurIPS. https://arxiv.org/abs/2102.02694
"""

__all__ = [
    "CONCATENATION_OFFSET",
    "LipschitzDenseLayer",
    "concatenation_weights",
    "dense_cnn",
    "dense_mlp",
    "linear_widths",
]

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.activation import get_activation, width_factor
from tfp_resflow.layers.lipschitz import SpectralDense
from tfp_resflow.layers.spectral_conv import SpectralConv2D

# Added to softplus(k_j) so that neither part of the concatenation can be switched off.
CONCATENATION_OFFSET = 0.1


def concatenation_weights(logits: tf.Tensor, lipschitz_constant: float) -> tf.Tensor:
    """`(eta_1, eta_2)` from the two logits: positive, with `eta_1**2 + eta_2**2 = c**2`.

    Args:
        logits: `[2]` float Tensor `(k_1, k_2)`.
        lipschitz_constant: c.

    Returns:
        `[2]` Tensor `c * e / ||e||_2` with `e = softplus(logits) + 0.1`.
    """
    e = tf.nn.softplus(logits) + CONCATENATION_OFFSET
    return lipschitz_constant * e / tf.norm(e)


@keras.saving.register_keras_serializable(package="tfp_resflow")
class LipschitzDenseLayer(keras.layers.Layer):
    """One dense layer `x -> concat([eta_1 x, eta_2 phi(linear(x))], -1)` with Lip <= c.

    See the module docstring for the weights eta and the proof of the bound.

    Args:
        linear: a `SpectralDense` or `SpectralConv2D` with norm at most `lipschitz_constant`.
        activation: a 1-Lipschitz (in l2) activation layer.
        lipschitz_constant: c, the l2 norm of `(eta_1, eta_2)`.
        learnable_concatenation: whether the logits `k_1, k_2` train (else fixed at 1, so
            eta_1 = eta_2 = c / sqrt(2)).
        **kwargs: passed to `keras.layers.Layer` (e.g. `dtype`, `name`).

    Input: `[..., n]`. Output: `[..., n + k]`, k the width of `activation`'s output.
    """

    def __init__(
        self,
        linear: keras.layers.Layer,
        activation: keras.layers.Layer,
        *,
        lipschitz_constant: float,
        learnable_concatenation: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.linear = linear
        self.activation = activation
        self.lipschitz_constant = validation.number(
            "lipschitz_constant", lipschitz_constant, above=0, below=1
        )
        self.learnable_concatenation = validation.boolean(
            "learnable_concatenation", learnable_concatenation
        )

    def build(self, input_shape: tuple) -> None:
        # Sublayers restored from a config arrive built.
        if not self.linear.built:
            self.linear.build(input_shape)
        if not self.activation.built:
            self.activation.build(self.linear.compute_output_shape(input_shape))
        # The authors start both logits at 1 (eta_1 = eta_2 at first).
        self.concatenation_logits = self.add_weight(
            shape=(2,),
            initializer="ones",
            trainable=self.learnable_concatenation,
            name="concatenation_logits",
        )

    def concatenation_weights(self) -> tf.Tensor:
        """`(eta_1, eta_2)`, a `[2]` Tensor (see `concatenation_weights`)."""
        logits = tf.convert_to_tensor(self.concatenation_logits)
        return concatenation_weights(logits, self.lipschitz_constant)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        eta = tf.cast(self.concatenation_weights(), x.dtype)
        new = self.activation(self.linear(x))
        return tf.concat([eta[0] * x, eta[1] * new], axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        new = self.activation.compute_output_shape(self.linear.compute_output_shape(input_shape))
        last = None if input_shape[-1] is None or new[-1] is None else input_shape[-1] + new[-1]
        return (*input_shape[:-1], last)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            linear=keras.saving.serialize_keras_object(self.linear),
            activation=keras.saving.serialize_keras_object(self.activation),
            lipschitz_constant=self.lipschitz_constant,
            learnable_concatenation=self.learnable_concatenation,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "LipschitzDenseLayer":
        config = dict(config)
        for key in ("linear", "activation"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def linear_widths(name: str, growths: Sequence[int], activation: str) -> list[int]:
    """Output widths of the dense layers' linear maps that give the features `growths`.

    CLipSwish doubles its input, so its growths must be even and the maps give half of them.

    Raises:
        ValueError: naming `name`, for a non-positive growth or an odd one with CLipSwish.
    """
    growths = validation.integers(name, growths, nonempty=False)
    factor = width_factor(activation)
    if any(k % factor for k in growths):
        validation.fail(name, f"growths divisible by {factor} with {activation}", growths)
    return [k // factor for k in growths]


def _dense_function(
    input_shape: tuple[int, ...],
    make_linear: Callable[..., keras.layers.Layer],
    inner_args: list[tuple],
    out_args: tuple,
    *,
    lipschitz_constant: float,
    activation: str,
    learnable_concatenation: bool,
    projection_args: tuple | None,
    zero_init_last: bool,
    name: str | None,
    layer_kwargs: dict,
) -> keras.Sequential:
    """`keras.Sequential([Input, (P), h_1, ..., h_n, W_out])`; `make_linear(*args, **options)`."""
    dtype = layer_kwargs["dtype"]
    options = {"lipschitz_constant": lipschitz_constant, **layer_kwargs}
    layers = [keras.Input(input_shape, dtype=dtype)]
    if projection_args is not None:
        layers.append(make_linear(*projection_args, **options))
    for args in inner_args:
        layers.append(
            LipschitzDenseLayer(
                make_linear(*args, **options),
                get_activation(activation, dtype=dtype),
                lipschitz_constant=lipschitz_constant,
                learnable_concatenation=learnable_concatenation,
                dtype=dtype,
            )
        )
    initializer = "zeros" if zero_init_last else "glorot_uniform"
    layers.append(make_linear(*out_args, kernel_initializer=initializer, **options))
    return keras.Sequential(layers, name=name)


def dense_mlp(
    event_size: int,
    growths: Sequence[int] = (32, 32, 32),
    *,
    lipschitz_constant: float = 0.9,
    activation: str = "clipswish",
    learnable_concatenation: bool = True,
    projection_units: int | None = None,
    zero_init_last: bool = False,
    dtype: str | None = None,
    name: str | None = None,
    **layer_kwargs,
) -> keras.Sequential:
    """Builds a fully connected dense g, [batch, D] -> [batch, D], with Lip(g) <= c.

        g = Dense(-> D) o h_n o ... o h_1 [o Dense(D -> projection_units)]

    Args:
        event_size: D.
        growths: features k_i each dense layer appends (depth n = len(growths)); even for
            CLipSwish.
        lipschitz_constant: c in (0, 1): every linear layer's norm and every ||eta||_2.
        activation: a name in `tfp_resflow.layers.activation.ACTIVATIONS`.
        learnable_concatenation: train the concatenation logits (see `LipschitzDenseLayer`).
        projection_units: if set, g starts with a linear map to this many features (the
            authors' fully connected end blocks of image flows: 64).
        zero_init_last: start the last kernel at zero.
        dtype: layer dtype.
        name: model name.
        **layer_kwargs: passed to every `SpectralDense` (e.g. `initial_power_iterations`).

    Raises:
        ValueError: on a bad size, growth or activation, naming it.
    """
    event_size = validation.positive_integer("event_size", event_size)
    widths = linear_widths("growths", growths, activation)
    width = event_size
    projection = None
    if projection_units is not None:
        width = validation.positive_integer("projection_units", projection_units)
        projection = (width,)
    return _dense_function(
        (event_size,),
        SpectralDense,
        [(w,) for w in widths],
        (event_size,),
        lipschitz_constant=lipschitz_constant,
        activation=activation,
        learnable_concatenation=learnable_concatenation,
        projection_args=projection,
        zero_init_last=zero_init_last,
        name=name,
        layer_kwargs={"dtype": dtype, **layer_kwargs},
    )


def dense_cnn(
    input_shape: Sequence[int],
    growth: int = 172,
    kernel_sizes: Sequence[int] = (3, 3, 3, 1),
    *,
    lipschitz_constant: float = 0.98,
    activation: str = "clipswish",
    learnable_concatenation: bool = True,
    zero_init_last: bool = False,
    dtype: str | None = None,
    name: str | None = None,
    **layer_kwargs,
) -> keras.Sequential:
    """Builds a convolutional dense g, [batch, H, W, C] -> [batch, H, W, C], Lip(g) <= c.

        g = Conv(k_out, -> C) o h_n o ... o h_1,   h_i with a Conv(k_i, -> growth)

    (the authors': n = 3 layers of 3x3 convolutions and a 1x1 convolution to C, no
    pre-activation). Convolutions are stride 1, "same" padding; their norms are those of the
    convolution operators on H x W images.

    Args:
        input_shape: (H, W, C).
        growth: channels each dense layer appends (172 in the paper); even for CLipSwish.
        kernel_sizes: odd kernel size of each dense layer's convolution, then the last's.
        lipschitz_constant: c in (0, 1): every convolution's norm and every ||eta||_2.
        activation: a name in `tfp_resflow.layers.activation.ACTIVATIONS`.
        learnable_concatenation: train the concatenation logits.
        zero_init_last: start the last kernel at zero.
        dtype: layer dtype.
        name: model name.
        **layer_kwargs: passed to every `SpectralConv2D` (e.g. `initial_power_iterations`).

    Raises:
        ValueError: on a bad shape, growth, kernel size or activation, naming it.
    """
    shape = validation.image_shape("input_shape", input_shape)
    kernels = validation.integers("kernel_sizes", kernel_sizes, odd=True)
    growth = validation.positive_integer("growth", growth)
    (width,) = linear_widths("growth", (growth,), activation)
    return _dense_function(
        shape,
        SpectralConv2D,
        [(width, k) for k in kernels[:-1]],
        (shape[-1], kernels[-1]),
        lipschitz_constant=lipschitz_constant,
        activation=activation,
        learnable_concatenation=learnable_concatenation,
        projection_args=None,
        zero_init_last=zero_init_last,
        name=name,
        layer_kwargs={"dtype": dtype, **layer_kwargs},
    )
