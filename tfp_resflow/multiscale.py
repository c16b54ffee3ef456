"""`MultiscaleResidualFlow`: the multi-scale image flow of Chen et al. (2019) as one bijector.

Data -> latent (TFP's `inverse`), for images `[H, W, C]` scaled to [0, 1):

    LogitTransform(alpha)                        if logit_alpha is not None
    Squeeze                                      if squeeze_first
    scale 0:  ActNorm, then blocks_per_scale[0] x [ResidualBlock -> ActNorm], Squeeze
              (factor-out: the second half of the channels leaves as latent f_0)
    scale 1:  blocks_per_scale[1] x [ResidualBlock -> ActNorm], Squeeze  (f_1)
    ...
    last scale: blocks x [ResidualBlock -> ActNorm], no squeeze
    flatten; fc_end_blocks x [fully connected ResidualBlock -> ActNorm]  (over the final vector)
    z = concat([flatten(f_0), ..., flatten(f_{S-2}), final vector])      D = H * W * C entries

Every flatten is row-major over `[h, w, c]`. The ActNorms are optional (`actnorm`). Each
convolutional block's `g` is `network.lipschitz_cnn` (`SpectralConv2D`s with norm at most
`lipschitz_constant`, pre-activation, except the network's first block, which starts with a
convolution as in the authors' model); each fully connected block's `g` is
`network.lipschitz_mlp`. The latent is always a flat vector, so the base distribution is
`tfd.Sample(tfd.Normal(0, 1), [D])`, and `forward` (used by `sample`) re-splits it, inverting
every block with its fixed-point iteration.

The number of scales is `len(blocks_per_scale)`: each scale but the last ends with a squeeze, so
H and W must divide by `2**(len(blocks_per_scale) - 1)` (times 2 with `squeeze_first`). The
authors silently drop scales that would go below 4 pixels; here a mismatch is an error.

References:
    Chen, Behrmann, Duvenaud, Jacobsen (2019). Residual Flows for Invertible Generative
    Modeling. NeurIPS. https://arxiv.org/abs/1906.02735
    Dinh, Sohl-Dickstein, Bengio (2017). Density estimation using Real NVP (multi-scale
    architecture, factor-out). ICLR. https://arxiv.org/abs/1605.08803
"""

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow import network, stateless_random
from tfp_resflow.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijector import FreshBijector, ResidualBlock
from tfp_resflow.image import LogitTransform, Squeeze
from tfp_resflow.presets import ImageFlowConfig, get_preset

tfb = tfp.bijectors

__all__ = ["MultiscaleResidualFlow", "image_flow", "scale_shapes"]


def _is_positive_integral(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


@keras.saving.register_keras_serializable(package="tfp_resflow")
class MultiscaleResidualFlow(FreshBijector):
    """Multi-scale Residual Flow for images `[..., H, W, C]` (see the module docstring).

        inverse(x):  [..., H, W, C] -> [..., D]   data -> latent, no fixed-point solves
        forward(z):  [..., D] -> [..., H, W, C]   latent -> data, one solve per block
        inverse_log_det_jacobian(x) = logit + ActNorm + residual log-dets (estimated)

    Built at construction. `inverse_log_det_jacobian` takes an optional `seed`: each block then
    gets `stateless_random.fold_in(seed, k)` (blocks numbered in data -> latent order), so a
    seeded estimate is reproducible.

    Example:
        flow = MultiscaleResidualFlow((28, 28, 1), presets.ImageFlowConfig(hidden_channels=64))
        base = tfd.Sample(tfd.Normal(0.0, 1.0), [28 * 28])
        distribution = tfd.TransformedDistribution(base, flow)   # event shape [28, 28, 1]

    Args:
        input_shape: `(H, W, C)` of one image.
        config: a `presets.ImageFlowConfig` (default: the authors' CIFAR-10 settings).
        dtype: dtype of the layers' weights; by default Keras' float type (float32).
        validate_args: check inputs for NaN/inf (and the logit's input range).
        name: name scope.

    Raises:
        ValueError: for a bad input shape, naming it (including H or W that the squeezes do
            not divide).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        config: ImageFlowConfig | None = None,
        *,
        dtype: str | None = None,
        validate_args: bool = False,
        name: str = "multiscale_residual_flow",
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            config = ImageFlowConfig() if config is None else config
            if not isinstance(config, ImageFlowConfig):
                raise ValueError(f"config must be an ImageFlowConfig; got {config!r}.")
            self._config = config
            self._scale_shapes = scale_shapes(input_shape, config)
            self._image_shape = tuple(int(n) for n in input_shape)
            self._dtype_name = None if dtype is None else tf.as_dtype(dtype).name
            self._validate = validate_args
            self._blocks: list[ResidualBlock] = []
            self._actnorms: list[ActNorm] = []
            self._build()
            super().__init__(
                forward_min_event_ndims=1,
                inverse_min_event_ndims=3,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )
            self._track_keras_variables()

    # -- building --------------------------------------------------------------------------------

    def _new_actnorm(self, shape: tuple[int, ...]) -> ActNorm:
        event_ndims = len(shape)
        actnorm = ActNorm(
            ActNormLayer(dtype=self._dtype_name),
            event_ndims=event_ndims,
            validate_args=self._validate,
            name=f"act_norm_{len(self._actnorms)}",
        )
        actnorm.layer.build((None, *shape))
        self._actnorms.append(actnorm)
        return actnorm

    def _new_block(self, g: keras.Model, event_ndims: int, name: str) -> ResidualBlock:
        c = self._config
        block = ResidualBlock(
            g,
            event_ndims=event_ndims,
            log_det=c.log_det,
            log_det_options=c.log_det_options(),
            validate_args=self._validate,
            name=name,
        )
        self._blocks.append(block)
        return block

    def _build(self) -> None:
        c = self._config
        layer_options = {"dtype": self._dtype_name}
        if c.initial_power_iterations is not None:
            layer_options["initial_power_iterations"] = c.initial_power_iterations
        # Each step is (bijector, event_ndims of its input), in data -> latent order.
        self._prelude: list[tuple[tfb.Bijector, int]] = []
        if c.logit_alpha is not None:
            self._prelude.append((LogitTransform(c.logit_alpha, validate_args=self._validate), 3))
        if c.squeeze_first:
            self._prelude.append((Squeeze(validate_args=self._validate), 3))
        self._scales: list[list[tuple[tfb.Bijector, int]]] = []
        for i, (num_blocks, shape) in enumerate(
            zip(c.blocks_per_scale, self._scale_shapes, strict=True)
        ):
            steps: list[tuple[tfb.Bijector, int]] = []
            if i == 0 and c.actnorm:
                steps.append((self._new_actnorm(shape), 3))
            for j in range(num_blocks):
                g = network.lipschitz_cnn(
                    shape,
                    c.hidden_channels,
                    c.kernel_sizes,
                    lipschitz_constant=c.lipschitz_constant,
                    activation=c.activation,
                    learnable_norm_orders=c.learnable_norm_orders,
                    activation_first=(i, j) != (0, 0),  # the authors' first block: no pre-act
                    **layer_options,
                )
                steps.append((self._new_block(g, 3, f"block_{i}_{j}"), 3))
                if c.actnorm:
                    steps.append((self._new_actnorm(shape), 3))
            if i < len(self._scale_shapes) - 1:
                steps.append((Squeeze(validate_args=self._validate), 3))
            self._scales.append(steps)
        self._factored_shapes = self._scale_shapes[1:] if c.factor_out else []
        self._final_shape = self._scale_shapes[-1]
        size = math.prod(self._final_shape)
        self._fc_end: list[tuple[tfb.Bijector, int]] = []
        for k in range(c.fc_end_blocks):
            g = network.lipschitz_mlp(
                size,
                c.fc_hidden_units,
                lipschitz_constant=c.lipschitz_constant,
                activation=c.activation,
                learnable_norm_orders=c.learnable_norm_orders,
                **layer_options,
            )
            self._fc_end.append((self._new_block(g, 1, f"fc_block_{k}"), 1))
            if c.actnorm:
                self._fc_end.append((self._new_actnorm((size,)), 1))

    # -- properties ------------------------------------------------------------------------------

    @property
    def config(self) -> ImageFlowConfig:
        """The `ImageFlowConfig` this flow was built from."""
        return self._config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(H, W, C)` of the data."""
        return self._image_shape

    @property
    def latent_size(self) -> int:
        """D = H * W * C, the length of the latent vector."""
        return math.prod(self._image_shape)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the latent's parts in order: the factored-out halves, then the final one."""
        return [*self._factored_shapes, self._final_shape]

    @property
    def blocks(self) -> list[ResidualBlock]:
        """All residual blocks, in data -> latent order (convolutional, then fully connected)."""
        return list(self._blocks)

    @property
    def actnorms(self) -> list[ActNorm]:
        """All ActNorm bijectors, in data -> latent order."""
        return list(self._actnorms)

    def _steps(self) -> list[tuple[tfb.Bijector, int]]:
        return [*self._prelude, *(s for scale in self._scales for s in scale), *self._fc_end]

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        return [layer for b, _ in self._steps() for layer in getattr(b, "keras_layers", [])]

    def get_config(self) -> dict:
        """Constructor arguments, for Keras serialisation."""
        return {
            "input_shape": list(self._image_shape),
            "config": self._config.to_dict(),
            "dtype": self._dtype_name,
            "validate_args": self._validate,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> "MultiscaleResidualFlow":
        """Rebuilds a flow from `get_config`."""
        config = dict(config)
        flow_config = config.pop("config")
        if isinstance(flow_config, Mapping):
            flow_config = ImageFlowConfig.from_dict(flow_config)
        return cls(config.pop("input_shape"), flow_config, **config)

    # -- shapes ----------------------------------------------------------------------------------

    def _check_events(self, t: tf.Tensor, expected: Sequence[int], what: str) -> tf.Tensor:
        ndims = len(expected)
        shape = t.shape
        if shape.rank is not None and (
            shape.rank < ndims or not shape[shape.rank - ndims :].is_compatible_with(expected)
        ):
            raise ValueError(
                f"{self.name}: {what} must have shape [..., {', '.join(map(str, expected))}]; "
                f"got shape {shape}."
            )
        return self._check_finite(t, what)

    def _inverse_event_shape(self, output_shape: tf.TensorShape) -> tf.TensorShape:
        shape = tf.TensorShape(output_shape)
        if not shape.is_compatible_with(self._image_shape):
            raise ValueError(
                f"{self.name} was built for images of shape {list(self._image_shape)}; "
                f"got event shape {shape}."
            )
        return tf.TensorShape([self.latent_size])

    def _forward_event_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        shape = tf.TensorShape(input_shape)
        if not shape.is_compatible_with([self.latent_size]):
            raise ValueError(
                f"{self.name} has latents of shape [{self.latent_size}]; got event shape {shape}."
            )
        return tf.TensorShape(self._image_shape)

    def _inverse_event_shape_tensor(self, output_shape: tf.Tensor) -> tf.Tensor:
        return tf.constant([self.latent_size], tf.int32)

    def _forward_event_shape_tensor(self, input_shape: tf.Tensor) -> tf.Tensor:
        return tf.constant(self._image_shape, tf.int32)

    # -- TFP hooks -------------------------------------------------------------------------------

    def _walk(self, y: tf.Tensor, *, log_det: bool, seed: Any) -> tuple[tf.Tensor, Any]:
        """Data -> latent, with the log-det accumulated when `log_det`.

        Each step's log-det is taken after its `inverse`, so an ActNorm initialised by this
        batch contributes its initialised scale. The residual blocks evaluate `g` once for the
        value and again inside their estimator; fusing the two is a later optimisation.
        """
        y = self._check_events(y, self._image_shape, "images")
        shape = tf.shape(y)
        batch_shape = shape[: tf.rank(y) - 3]
        t = tf.reshape(y, [-1, *self._image_shape])
        total = tf.zeros(tf.shape(t)[:1], t.dtype) if log_det else None
        seed = None if seed is None else stateless_random.sanitize_seed(seed)
        num_blocks = 0

        def apply(b: tfb.Bijector, t: tf.Tensor, event_ndims: int) -> tf.Tensor:
            nonlocal total, num_blocks
            out = b.inverse(t)
            if log_det:
                kwargs = {}
                if isinstance(b, ResidualBlock):
                    if seed is not None:
                        kwargs["seed"] = stateless_random.fold_in(seed, num_blocks)
                    num_blocks += 1
                total += b.inverse_log_det_jacobian(t, event_ndims=event_ndims, **kwargs)
            return out

        for b, event_ndims in self._prelude:
            t = apply(b, t, event_ndims)
        parts = []
        for i, scale in enumerate(self._scales):
            for b, event_ndims in scale:
                t = apply(b, t, event_ndims)
            if self._config.factor_out and i < len(self._scales) - 1:
                kept = t.shape[-1] // 2
                parts.append(tf.reshape(t[..., kept:], [tf.shape(t)[0], -1]))
                t = t[..., :kept]
        t = tf.reshape(t, [-1, math.prod(self._final_shape)])
        for b, event_ndims in self._fc_end:
            t = apply(b, t, event_ndims)
        z = tf.concat([*parts, t], axis=-1) if parts else t
        z = tf.reshape(z, tf.concat([batch_shape, [self.latent_size]], axis=0))
        if log_det:
            total = tf.reshape(total, batch_shape)
        return z, total

    def _inverse(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return self._walk(y, log_det=False, seed=None)[0]

    def _inverse_log_det_jacobian(self, y: tf.Tensor, seed: Any = None) -> tf.Tensor:
        return self._walk(y, log_det=True, seed=seed)[1]

    def _forward(self, z: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        z = self._check_events(z, [self.latent_size], "latents")
        batch_shape = tf.shape(z)[:-1]
        flat = tf.reshape(z, [-1, self.latent_size])
        sizes = [math.prod(s) for s in self.latent_shapes]
        parts = tf.split(flat, sizes, axis=-1)
        t = parts[-1]
        for b, _ in reversed(self._fc_end):
            t = b.forward(t)
        t = tf.reshape(t, [-1, *self._final_shape])
        for i in reversed(range(len(self._scales))):
            if self._config.factor_out and i < len(self._scales) - 1:
                factored = tf.reshape(parts[i], [-1, *self._factored_shapes[i]])
                t = tf.concat([t, factored], axis=-1)
            for b, _ in reversed(self._scales[i]):
                t = b.forward(t)
        for b, _ in reversed(self._prelude):
            t = b.forward(t)
        return tf.reshape(t, tf.concat([batch_shape, self._image_shape], axis=0))


def scale_shapes(input_shape: Sequence[int], config: ImageFlowConfig) -> list[tuple[int, ...]]:
    """The event shape `(h, w, c)` on which each scale's blocks act, in order.

    With factor-out, scale `i + 1`'s shape is also that of the latent part leaving after scale
    `i`. For example `(64, 64, 3)` with the `imagenet64` preset gives `(32, 32, 12)`,
    `(16, 16, 24)`, `(8, 8, 48)`.

    Raises:
        ValueError: for a shape that is not `(H, W, C)`, or whose height or width the squeezes
            do not divide; the message names the shape.
    """
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3 or not all(_is_positive_integral(n) for n in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive integers; "
            f"got {input_shape!r}."
        )
    shape = tuple(int(n) for n in shape)
    num_squeezes = len(config.blocks_per_scale) - 1 + int(config.squeeze_first)
    divisor = 2**num_squeezes
    if shape[0] % divisor or shape[1] % divisor:
        raise ValueError(
            f"Images of shape {shape} cannot be squeezed {num_squeezes} times "
            f"({len(config.blocks_per_scale)} scales, squeeze_first={config.squeeze_first}): "
            f"height and width must be divisible by {divisor}."
        )
    h, w, c = shape
    if config.squeeze_first:
        h, w, c = h // 2, w // 2, 4 * c
    shapes = [(h, w, c)]
    for _ in config.blocks_per_scale[1:]:
        h, w, c = h // 2, w // 2, (2 if config.factor_out else 4) * c
        shapes.append((h, w, c))
    return shapes


def image_flow(
    input_shape: Sequence[int],
    config: ImageFlowConfig | str,
    *,
    dtype: str | None = None,
    validate_args: bool = False,
    name: str = "multiscale_residual_flow",
) -> MultiscaleResidualFlow:
    """Builds the multi-scale Residual Flow for images of `input_shape`.

    Args:
        input_shape: `(H, W, C)` of one image, e.g. `presets.PRESET_INPUT_SHAPES["mnist"]`.
        config: an `ImageFlowConfig` or a preset name (`presets.PRESETS`).
        dtype: dtype of the weights; by default Keras' float type.
        validate_args: check inputs at run time.
        name: name scope.

    Returns:
        A `MultiscaleResidualFlow`, built.

    Raises:
        ValueError: for an unknown preset or an image shape the squeezes do not divide.
    """
    if isinstance(config, str):
        config = get_preset(config)
    return MultiscaleResidualFlow(
        input_shape, config, dtype=dtype, validate_args=validate_args, name=name
    )
