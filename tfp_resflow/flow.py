"""`ResidualFlowBijector`: a stack of residual blocks with ActNorm, for vector events.

    data -> latent (inverse):  ActNorm_0 -> [ResidualBlock_k -> ActNorm_k] for k = 1..num_blocks

as in the authors' models (an ActNorm before the first block and after every block). Each block's
`g` is `tfp_resflow.network.lipschitz_mlp`, so `Lip(g) <= lipschitz_constant < 1`. The layers
are created on first use, when the event size is known, or by `build(event_size)`.

Example:
    flow = ResidualFlowBijector()
    distribution = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [2]), flow)
    log_p = distribution.log_prob(x)           # x: [batch, 2]
"""

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow import network
from tfp_resflow.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijector import ResidualBlock
from tfp_resflow.composite import StackedBijector, Step
from tfp_resflow.logdet import LogDetFn

tfb = tfp.bijectors

__all__ = ["ResidualFlowBijector"]


@keras.saving.register_keras_serializable(package="tfp_resflow")
class ResidualFlowBijector(StackedBijector):
    """A residual flow for vector events `[..., D]`, sized on first use.

    Args:
        num_blocks: number of residual blocks.
        hidden_units: widths of the hidden layers of each block's `g`.
        lipschitz_constant: `c` in (0, 1), the bound on every linear layer's norm (Chen et al.
            use 0.9 for 2-D data, 0.98 for images).
        activation: activation of `g` ("lipswish", "elu", "softplus", "tanh", ...).
        norm_orders: orders of the norms at the boundaries of each `g`'s linear layers
            (`len(hidden_units) + 2` of them, first = last); default all 2 (spectral norms).
            See `network.lipschitz_mlp`.
        learnable_norm_orders: learn those orders (each `g` its own), starting from
            `norm_orders`; `FlowModel` trains them (see `tfp_resflow.norm_order`).
        actnorm: put an ActNorm before the first block and after every block.
        log_det: training estimator, "unbiased" (default), "exact", "truncated" or a callable.
        log_det_options: options of the training estimator, e.g. `{"p": 0.5}`.
        eval_log_det: evaluation estimator; "auto" (exact up to 20 dimensions, else the roulette
            with 20 exact terms), or as `log_det`.
        eval_log_det_options: options of an explicit evaluation estimator.
        atol: absolute tolerance of the fixed-point inverse of each block (default: by dtype,
            see `ResidualBlock`).
        rtol: relative tolerance of the fixed-point inverse of each block.
        max_iterations: iteration cap of the fixed-point inverse of each block.
        event_size: D, to build now; by default the flow is built on first use.
        validate_args: check inputs for NaN/inf and the event size at run time.
        name: name scope.
    """

    def __init__(
        self,
        num_blocks: int = 8,
        *,
        hidden_units: Sequence[int] = (128, 128),
        lipschitz_constant: float = 0.9,
        activation: str = "lipswish",
        norm_orders: Sequence[float | str] | None = None,
        learnable_norm_orders: bool = False,
        actnorm: bool = True,
        log_det: str | LogDetFn = "unbiased",
        log_det_options: Mapping[str, Any] | None = None,
        eval_log_det: str | LogDetFn = "auto",
        eval_log_det_options: Mapping[str, Any] | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int = 1000,
        event_size: int | None = None,
        validate_args: bool = False,
        name: str = "residual_flow",
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"num_blocks must be an integer >= 1; got {num_blocks!r}.")
            if not 0.0 < lipschitz_constant < 1.0:
                raise ValueError(
                    f"lipschitz_constant must be in (0, 1); got {lipschitz_constant!r}."
                )
            hidden_units = tuple(hidden_units)
            if norm_orders is not None or learnable_norm_orders is not False:
                norm_orders = network.check_norm_orders(
                    norm_orders,
                    len(hidden_units) + 1,
                    activation,
                    learnable=learnable_norm_orders,
                )
            self._config = {
                "num_blocks": num_blocks,
                "hidden_units": hidden_units,
                "lipschitz_constant": lipschitz_constant,
                "activation": activation,
                "norm_orders": None if norm_orders is None else tuple(norm_orders),
                "learnable_norm_orders": learnable_norm_orders,
                "actnorm": actnorm,
                "log_det": log_det,
                "log_det_options": dict(log_det_options or {}),
                "eval_log_det": eval_log_det,
                "eval_log_det_options": dict(eval_log_det_options or {}),
                "atol": atol,
                "rtol": rtol,
                "max_iterations": max_iterations,
                "validate_args": validate_args,
            }
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
                self.build(event_size)

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
        c = self._config
        dtype = tf.as_dtype(dtype).name if dtype is not None else None
        block_options = {
            key: c[key]
            for key in (
                "log_det",
                "log_det_options",
                "eval_log_det",
                "eval_log_det_options",
                "atol",
                "rtol",
                "max_iterations",
                "validate_args",
            )
        }
        steps = []  # data -> latent order

        def new_actnorm(k: int) -> Step:
            actnorm = ActNorm(
                ActNormLayer(dtype=dtype), validate_args=c["validate_args"], name=f"act_norm_{k}"
            )
            actnorm.layer.build((None, event_size))
            return Step(actnorm, 1)

        if c["actnorm"]:
            steps.append(new_actnorm(0))
        for k in range(1, c["num_blocks"] + 1):
            g = network.lipschitz_mlp(
                event_size,
                c["hidden_units"],
                lipschitz_constant=c["lipschitz_constant"],
                activation=c["activation"],
                norm_orders=c["norm_orders"],
                learnable_norm_orders=c["learnable_norm_orders"],
                dtype=dtype,
            )
            steps.append(Step(ResidualBlock(g, name=f"block_{k}", **block_options), 1))
            if c["actnorm"]:
                steps.append(new_actnorm(k))
        self._steps = steps
        self._set_shapes((event_size,))
        self._event_size = event_size
        self._track_keras_variables()

    @property
    def built(self) -> bool:
        """Whether the layers exist."""
        return self._event_size is not None

    @property
    def event_size(self) -> int | None:
        """D once built, else None."""
        return self._event_size

    def get_config(self) -> dict:
        """Constructor arguments (estimators given as names), for Keras serialisation."""
        config = dict(self._config, event_size=self._event_size, name=self.name)
        for key in ("log_det", "eval_log_det"):
            if callable(config[key]):
                raise NotImplementedError(
                    f"{self.name}: a callable {key} cannot be serialised; use a name and options."
                )
        config["hidden_units"] = list(config["hidden_units"])
        for key in ("log_det_options", "eval_log_det_options"):  # plain dicts (not tf.Module's
            config[key] = dict(config[key])  # tracking wrappers), so json can write them
        if config["norm_orders"] is not None:  # JSON-ready: a list, "inf" for infinity
            config["norm_orders"] = [
                "inf" if p == float("inf") else p for p in config["norm_orders"]
            ]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "ResidualFlowBijector":
        """Rebuilds a flow from `get_config`."""
        return cls(**config)

    # -- TFP hooks -------------------------------------------------------------------------------

    def _prepare(self, t: tf.Tensor, what: str) -> tf.Tensor:
        size = t.shape[-1] if t.shape.rank else None
        if size is None:
            if self._event_size is None:
                raise ValueError(
                    f"{self.name}: the event size of {what} is unknown (shape {t.shape}); "
                    "call build(event_size) first."
                )
        else:
            # Layers take the dtype of the first input; later calls check the event size.
            self.build(int(size), dtype=t.dtype if self._event_size is None else None)
        return t
