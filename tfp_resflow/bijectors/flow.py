"""`ResidualFlowBijector`: a stack of residual blocks with ActNorm, for vector events.

    data -> latent (inverse):  ActNorm_0 -> [ResidualBlock_k -> ActNorm_k] for k = 1..num_blocks

as in the authors' models (an ActNorm before the first block and after every block). Each block's
`g` is `tfp_resflow.layers.network.lipschitz_mlp` (`dense_network.dense_mlp`, the i-DenseNet block,
with `network="dense"`), so `Lip(g) <= lipschitz_constant < 1`. The layers are created on first use,
when the event size is known, or by `build(event_size)`.

Example:
    flow = ResidualFlowBijector()
    distribution = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [2]), flow)
    log_p = distribution.log_prob(x)           # x: [batch, 2]

    # p(x | c): every method takes conditional_input=c, [batch, K] or [K]
    flow = ResidualFlowBijector(context_size=3)
    distribution = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [2]), flow)
    log_p = distribution.log_prob(x, bijector_kwargs={"conditional_input": c})
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.composite import StackedBijector, Step
from tfp_resflow.bijectors.residual_block import ResidualBlock
from tfp_resflow.configs.config_fields import to_dict, with_fields
from tfp_resflow.configs.flow_configs import ResidualFlowConfig
from tfp_resflow.layers import dense_network, network

tfb = tfp.bijectors

__all__ = ["ResidualFlowBijector"]


@keras.saving.register_keras_serializable(package="tfp_resflow")
class ResidualFlowBijector(StackedBijector):
    """A residual flow for vector events `[..., D]`, sized on first use.

    Args:
        config: a `config.ResidualFlowConfig` (default: 8 blocks, hidden units 128-128,
            coefficient 0.9, LipSwish, ActNorm, the unbiased roulette).
        event_size: D, to build now; by default the flow is built on first use.
        dtype: dtype of the layers' weights; by default that of the first input (when built on
            first use) or Keras' float type (float32).
        validate_args: check inputs for NaN/inf and the event size at run time.
        name: name scope.
        **fields: fields of `ResidualFlowConfig` or of its `BlockConfig` replacing those of
            `config`, e.g. `ResidualFlowBijector(num_blocks=4, log_det="exact")`.

    Raises:
        ValueError: for an unknown field or a bad value, naming it.
    """

    def __init__(
        self,
        config: ResidualFlowConfig | None = None,
        *,
        event_size: int | None = None,
        dtype: str | None = None,
        validate_args: bool = False,
        name: str = "residual_flow",
        **fields: Any,
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            config = ResidualFlowConfig() if config is None else config
            if isinstance(config, Mapping):  # from get_config
                config = ResidualFlowConfig(**config)
            if not isinstance(config, ResidualFlowConfig):
                raise ValueError(f"config must be a ResidualFlowConfig; got {config!r}.")
            config = with_fields(config, **fields)
            if config.norm_orders is not None or config.learnable_norm_orders:
                orders = network.check_norm_orders(
                    config.norm_orders,
                    len(config.hidden_units) + 1,
                    config.activation,
                    learnable=config.learnable_norm_orders,
                )  # stored as checked: floats, the learnable default written out
                config = dataclasses.replace(config, norm_orders=tuple(orders))
            self._config = config
            self._context_size = config.context_size
            self._dtype_name = None if dtype is None else tf.as_dtype(dtype).name
            self._validate = validate_args
            self._event_size: int | None = None
            self._steps = []
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )
            if event_size is not None:
                self.build(event_size, dtype)

    @property
    def config(self) -> ResidualFlowConfig:
        """The `ResidualFlowConfig` this flow was built from."""
        return self._config

    # -- building --------------------------------------------------------------------------------

    def build(self, event_size: int, dtype: tf.DType | str | None = None) -> None:
        """Creates the blocks and their layers for events of `event_size` dimensions.

        Args:
            event_size: D.
            dtype: dtype of the layers' weights; by default Keras' float type (float32).
        """
        if isinstance(event_size, bool) or not isinstance(event_size, int) or event_size < 1:
            raise ValueError(f"event_size must be an integer >= 1; got {event_size!r}.")
        if self._event_size is not None:
            if event_size != self._event_size:
                raise ValueError(
                    f"{self.name} was built for events of size {self._event_size}; "
                    f"got events of size {event_size}."
                )
            return
        dtype = self._dtype_name if dtype is None else tf.as_dtype(dtype).name
        self._dtype_name = dtype or keras.config.floatx()
        steps = [self._new_actnorm(0, event_size, dtype)] if self._config.actnorm else []
        for k in range(1, self._config.num_blocks + 1):  # data -> latent order
            steps.append(self._new_block(k, event_size, dtype))
            if self._config.actnorm:
                steps.append(self._new_actnorm(k, event_size, dtype))
        self._steps = steps
        self._set_shapes((event_size,))
        self._event_size = event_size
        self._track_keras_variables()

    def _new_actnorm(self, k: int, event_size: int, dtype: str | None) -> Step:
        layer = ActNormLayer(dtype=dtype)
        layer.build((None, event_size))
        return Step(ActNorm(layer, validate_args=self._validate, name=f"act_norm_{k}"), 1)

    def _new_block(self, k: int, event_size: int, dtype: str | None) -> Step:
        c = self._config
        if c.network == "dense":
            g = dense_network.dense_mlp(
                event_size,
                c.hidden_units,
                lipschitz_constant=c.lipschitz_constant,
                activation=c.activation,
                learnable_concatenation=c.learnable_concatenation,
                lipschitz_estimate=c.lipschitz_estimate,
                dtype=dtype,
            )
        else:
            g = network.lipschitz_mlp(
                event_size,
                c.hidden_units,
                lipschitz_constant=c.lipschitz_constant,
                activation=c.activation,
                norm_orders=c.norm_orders,
                learnable_norm_orders=c.learnable_norm_orders,
                context_size=c.context_size,
                context_hidden_units=c.context_hidden_units,
                lipschitz_estimate=c.lipschitz_estimate,
                dtype=dtype,
            )
        block = ResidualBlock(
            g,
            c.block,
            context_size=c.context_size,
            validate_args=self._validate,
            name=f"block_{k}",
        )
        return Step(block, 1)

    @property
    def built(self) -> bool:
        """Whether the layers exist."""
        return self._event_size is not None

    @property
    def event_size(self) -> int | None:
        """D once built, else None."""
        return self._event_size

    def get_config(self) -> dict:
        """Constructor arguments (the config as a dict), for Keras serialisation.

        Raises:
            NotImplementedError: for a callable estimator, which cannot be written down.
        """
        return {
            "config": to_dict(self._config),
            "event_size": self._event_size,
            "dtype": self._dtype_name,
            "validate_args": self._validate,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> "ResidualFlowBijector":
        """Rebuilds a flow from `get_config`."""
        return cls(**config)

    # -- TFP hooks -------------------------------------------------------------------------------

    def _prepare(self, t: tf.Tensor, what: str) -> tf.Tensor:
        t = self._check_values(t, what)  # before the layers take its dtype
        size = t.shape[-1] if t.shape.rank else None
        if size is None:
            if self._event_size is None:
                raise ValueError(
                    f"{self.name}: the event size of {what} is unknown (shape {t.shape}); "
                    "call build(event_size) first."
                )
        else:
            # Layers take the dtype of the first input; later calls check the event size.
            first_use = self._event_size is None and self._dtype_name is None
            self.build(int(size), dtype=t.dtype if first_use else None)
        return t
