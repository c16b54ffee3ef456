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
`network.lipschitz_mlp`. With `network="dense"` they are the i-DenseNet blocks of
`dense_network` instead: `dense_cnn` (no pre-activation) and `dense_mlp` starting with a linear
projection to `fc_hidden_units[0]` features, as in Perugachi-Diaz et al. (2021). The latent is
always a flat vector, so the base distribution is
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
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.composite import FactorOut, Features, StackedBijector, Step
from tfp_resflow.bijectors.image import LogitTransform, Squeeze, scale_shapes
from tfp_resflow.bijectors.residual_block import ResidualBlock
from tfp_resflow.configs.config_fields import to_dict
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.configs.presets import get_preset
from tfp_resflow.layers import dense_network, network

tfb = tfp.bijectors

__all__ = ["MultiscaleResidualFlow", "image_flow", "scale_shapes"]


@keras.saving.register_keras_serializable(package="tfp_resflow")
class MultiscaleResidualFlow(StackedBijector):
    """Multi-scale Residual Flow for images `[..., H, W, C]` (see the module docstring).

        inverse(x):  [..., H, W, C] -> [..., D]   data -> latent, no fixed-point solves
        forward(z):  [..., D] -> [..., H, W, C]   latent -> data, one solve per block
        inverse_log_det_jacobian(x) = logit + ActNorm + residual log-dets (estimated)

    Built at construction. `inverse_log_det_jacobian` and `inverse_and_log_det` take an optional
    `seed`: each block then gets `stateless_random.fold_in(seed, k)` (blocks numbered in
    data -> latent order), so a seeded estimate is reproducible.

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
            self._context_size = config.context_size
            self._scale_shapes = scale_shapes(input_shape, config)
            self._image_shape = tuple(int(n) for n in input_shape)
            self._dtype_name = None if dtype is None else tf.as_dtype(dtype).name
            self._validate = validate_args
            self._num_actnorms = 0
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

    def _new_actnorm(self, shape: tuple[int, ...]) -> Step:
        actnorm = ActNorm(
            ActNormLayer(dtype=self._dtype_name),
            event_ndims=len(shape),
            validate_args=self._validate,
            name=f"act_norm_{self._num_actnorms}",
        )
        actnorm.layer.build((None, *shape))
        self._num_actnorms += 1
        return Step(actnorm, len(shape))

    def _new_block(self, g: keras.Model, event_ndims: int, name: str) -> Step:
        c = self._config
        block = ResidualBlock(
            g,
            c.block,
            event_ndims=event_ndims,
            context_size=c.context_size,
            validate_args=self._validate,
            name=name,
        )
        return Step(block, event_ndims)

    def _layer_options(self) -> dict:
        options = {"dtype": self._dtype_name, "lipschitz_estimate": self._config.lipschitz_estimate}
        if self._config.context_size is not None:  # resnet g only (checked by the config)
            options["context_size"] = self._config.context_size
            options["context_hidden_units"] = self._config.context_hidden_units
        if self._config.initial_power_iterations is not None:
            options["initial_power_iterations"] = self._config.initial_power_iterations
        return options

    def _new_cnn(self, shape: tuple[int, ...], *, activation_first: bool) -> keras.Model:
        """A convolutional `g` for images of `shape`."""
        c = self._config
        if c.network == "dense":
            return dense_network.dense_cnn(
                shape,
                c.hidden_channels,
                c.kernel_sizes,
                lipschitz_constant=c.lipschitz_constant,
                activation=c.activation,
                learnable_concatenation=c.learnable_concatenation,
                **self._layer_options(),
            )
        return network.lipschitz_cnn(
            shape,
            c.hidden_channels,
            c.kernel_sizes,
            lipschitz_constant=c.lipschitz_constant,
            activation=c.activation,
            learnable_norm_orders=c.learnable_norm_orders,
            activation_first=activation_first,  # the authors' first block: no pre-activation
            **self._layer_options(),
        )

    def _new_mlp(self, size: int) -> keras.Model:
        """A fully connected `g` for the flattened final tensor of `size` entries."""
        c = self._config
        if c.network == "dense":
            return dense_network.dense_mlp(
                size,
                c.fc_hidden_units[1:],
                projection_units=c.fc_hidden_units[0],
                lipschitz_constant=c.lipschitz_constant,
                activation=c.activation,
                learnable_concatenation=c.learnable_concatenation,
                **self._layer_options(),
            )
        return network.lipschitz_mlp(
            size,
            c.fc_hidden_units,
            lipschitz_constant=c.lipschitz_constant,
            activation=c.activation,
            learnable_norm_orders=c.learnable_norm_orders,
            **self._layer_options(),
        )

    def _scale_steps(self, i: int, num_blocks: int, shape: tuple[int, ...]) -> list:
        """Scale `i`: its blocks (each followed by ActNorm), its features mark, the squeeze."""
        c = self._config
        steps: list[Step | FactorOut | Features] = []
        if i == 0 and c.actnorm:
            steps.append(self._new_actnorm(shape))
        for j in range(num_blocks):
            g = self._new_cnn(shape, activation_first=(i, j) != (0, 0))
            steps.append(self._new_block(g, 3, f"block_{i}_{j}"))
            if c.actnorm:
                steps.append(self._new_actnorm(shape))
        # The classification head reads each scale's output: its factored-out part (the
        # FactorOut records it), or the whole activation (the authors' heads).
        last = i == len(self._scale_shapes) - 1
        if last or not c.factor_out:
            steps.append(Features())
        if not last:
            steps.append(Step(Squeeze(validate_args=self._validate), 3))
            if c.factor_out:
                steps.append(FactorOut())
        return steps

    def _fc_steps(self) -> list[Step]:
        """The fully connected blocks over the flattened final tensor."""
        c = self._config
        final_shape = self._scale_shapes[-1]
        size = math.prod(final_shape)
        # TFP's forward is latent -> data: its inverse flattens the final images.
        steps = [Step(tfb.Reshape(event_shape_out=final_shape, event_shape_in=[size]), 3)]
        for k in range(c.fc_end_blocks):
            g = self._new_mlp(size)
            steps.append(self._new_block(g, 1, f"fc_block_{k}"))
            if c.actnorm:
                steps.append(self._new_actnorm((size,)))
        return steps

    def _build(self) -> None:
        c = self._config
        steps: list[Step | FactorOut | Features] = []  # data -> latent order
        if c.logit_alpha is not None:
            steps.append(Step(LogitTransform(c.logit_alpha, validate_args=self._validate), 3))
        if c.squeeze_first:
            steps.append(Step(Squeeze(validate_args=self._validate), 3))
        for i, (num_blocks, shape) in enumerate(
            zip(c.blocks_per_scale, self._scale_shapes, strict=True)
        ):
            steps.extend(self._scale_steps(i, num_blocks, shape))
        steps.extend(self._fc_steps())
        self._steps = steps
        self._set_shapes(self._image_shape)

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

    def get_config(self) -> dict:
        """Constructor arguments, for Keras serialisation."""
        return {
            "input_shape": list(self._image_shape),
            "config": to_dict(self._config),
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
            flow_config = ImageFlowConfig(**flow_config)
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
        return self._check_values(t, what)

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

    # -- TFP hooks (the walks are StackedBijector's) ------------------------------------------

    def _prepare(self, t: tf.Tensor, what: str) -> tf.Tensor:
        if what == "y":
            t, what = self._check_events(t, self._image_shape, "images"), "images"
        else:
            t, what = self._check_events(t, [self.latent_size], "latents"), "latents"
        # TensorFlow's graph optimiser turns the traced blocks into an invalid graph for a
        # zero-size batch (docs: Known limitations); a static one gets a clear error here.
        if t.shape.num_elements() == 0:
            raise ValueError(f"{self.name}: {what} must be a non-empty batch; got shape {t.shape}.")
        return t


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
