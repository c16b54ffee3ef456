"""ActNorm: a per-feature affine bijector with data-dependent initialisation (Kingma & Dhariwal).

    inverse(y) = (y + bias) * exp(log_scale)        data -> latent
    inverse_log_det_jacobian(y) = sum(log_scale) * positions per event
    forward(z) = z * exp(-log_scale) - bias          latent -> data

The parameters are per feature for vectors `[..., D]` and per channel for images
`[..., H, W, C]` (then the log-det counts the `H * W` positions). On the first data -> latent call
with data-dependent initialisation enabled, `bias = -mean` and
`log_scale = -log(max(var, 0.2)) / 2` over the batch (and positions), so the first batch comes
out with zero mean and unit variance. The authors floor the variance at 0.2 "for numerical
issues": a near-constant feature would otherwise get a huge scale.
"""

from typing import Any

import keras
import tensorflow as tf

from tfp_resflow.bijectors.fresh_bijector import FreshBijector
from tfp_resflow.core import validation
from tfp_resflow.core.modes import data_dependent_init_enabled

__all__ = ["ActNorm", "ActNormLayer"]

MIN_VARIANCE = 0.2


@keras.saving.register_keras_serializable(package="tfp_resflow")
class ActNormLayer(keras.layers.Layer):
    """Owns ActNorm's weights: `bias`, `log_scale` (shape `[features]`) and `initialized`.

    `call(y)` is the data -> latent map `(y + bias) * exp(log_scale)`; `inverse(z)` undoes it.
    Data-dependent initialisation runs through `maybe_initialize(y)`.

    Args:
        min_variance: floor of the per-feature variance used at initialisation (> 0).
    """

    def __init__(self, *, min_variance: float = MIN_VARIANCE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_variance = validation.number("min_variance", min_variance, above=0)

    def build(self, input_shape: tuple) -> None:
        features = input_shape[-1]
        if features is None:
            raise ValueError(f"ActNormLayer needs a known last dimension; got {input_shape}.")
        # aggregation="mean": under tf.distribute each replica initialises from its own batch
        # and the replicas agree on the mean.
        self.bias = self.add_weight(
            shape=(features,), initializer="zeros", name="bias", aggregation="mean"
        )
        self.log_scale = self.add_weight(
            shape=(features,), initializer="zeros", name="log_scale", aggregation="mean"
        )
        self.initialized = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="initialized", aggregation="mean"
        )

    def maybe_initialize(self, y: tf.Tensor) -> None:
        """Sets `bias` and `log_scale` from the batch `y` if not initialised yet.

        A layer that is initialised when a graph is traced adds nothing to that graph (the flag
        only ever goes from 0 to 1): a deep flow's training step then carries no initialisation
        branches (53 of them in the `mnist` preset).
        """
        if not data_dependent_init_enabled() or self.is_initialized():
            return
        y = tf.convert_to_tensor(y)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # An assignment inside a tf.cond in a replica context would need a cross-replica
            # merge, which TF does not allow there; and one replica sees only its share of the
            # batch. Initialise before training instead (FlowModel.initialize does).
            tf.debugging.Assert(
                self.initialized > 0.5,
                [
                    f"{self.name}: not initialised; under a tf.distribute strategy call "
                    "FlowModel.initialize(batch) (or run the flow once) before training."
                ],
            )
            return

        def initialize() -> tf.Tensor:
            axes = list(range(y.shape.rank - 1))
            mean = tf.reduce_mean(y, axis=axes)
            variance = tf.reduce_mean(tf.square(y - mean), axis=axes)
            self.bias.assign(tf.cast(-mean, self.bias.dtype))
            floor = tf.constant(self.min_variance, variance.dtype)
            self.log_scale.assign(
                tf.cast(-0.5 * tf.math.log(tf.maximum(variance, floor)), self.log_scale.dtype)
            )
            self.initialized.assign(1.0)
            return tf.ones([], tf.bool)

        tf.cond(self.initialized < 0.5, initialize, lambda: tf.zeros([], tf.bool))

    def is_initialized(self) -> bool:
        """Whether the layer is known to be initialised now (read eagerly, also while tracing).

        A distributed flag (a layer built under a `tf.distribute` strategy) cannot be read
        eagerly from inside a traced function, so the answer is then False (the graph keeps its
        initialisation branch).
        """
        if tf.distribute.has_strategy() or isinstance(
            self.initialized.value, tf.distribute.DistributedValues
        ):
            return False
        with tf.init_scope():
            return bool(self.initialized.numpy() > 0.5)

    def call(self, y: tf.Tensor) -> tf.Tensor:
        bias = tf.cast(self.bias, y.dtype)
        return (y + bias) * tf.exp(tf.cast(self.log_scale, y.dtype))

    def inverse(self, z: tf.Tensor) -> tf.Tensor:
        """The latent -> data map `z * exp(-log_scale) - bias`."""
        return z * tf.exp(-tf.cast(self.log_scale, z.dtype)) - tf.cast(self.bias, z.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "min_variance": self.min_variance}


class ActNorm(FreshBijector):
    """ActNorm as a TFP bijector over events of rank `event_ndims` (1: `[D]`, 3: `[H, W, C]`).

    Args:
        layer: the `ActNormLayer` holding the weights; a new one by default. It is built on the
            first call from the input's last dimension.
        event_ndims: 1 for vectors, 3 for images.
        validate_args: check inputs for NaN/inf.
        name: name scope.
    """

    def __init__(
        self,
        layer: ActNormLayer | None = None,
        *,
        event_ndims: int = 1,
        validate_args: bool = False,
        name: str = "act_norm",
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            if event_ndims not in (1, 3):
                validation.fail("event_ndims", "1 or 3", event_ndims)
            self._layer = layer if layer is not None else ActNormLayer()
            self._event_ndims = event_ndims
            super().__init__(
                forward_min_event_ndims=event_ndims,
                is_constant_jacobian=True,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    @property
    def layer(self) -> ActNormLayer:
        """The Keras layer owning `bias` and `log_scale`."""
        return self._layer

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        return [self._layer]

    def _prepare(self, t: tf.Tensor, name: str) -> tf.Tensor:
        if t.shape.rank is not None and t.shape.rank < self._event_ndims:
            raise ValueError(
                f"{self.name}: {name} must have at least {self._event_ndims} dimensions; "
                f"got shape {t.shape}."
            )
        if not self._layer.built:
            self._layer.build(tuple(t.shape))
            self._track_keras_variables()
        return self._check_values(t, name)

    def _inverse(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        y = self._prepare(y, "y")
        self._layer.maybe_initialize(y)
        return self._layer(y)

    def _forward(self, z: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return self._layer.inverse(self._prepare(z, "z"))

    def _log_det(self, t: tf.Tensor) -> tf.Tensor:
        t = self._prepare(t, "input")
        positions = 1
        if self._event_ndims == 3:
            positions = tf.reduce_prod(tf.shape(t)[-3:-1])
        per_event = tf.reduce_sum(tf.cast(self._layer.log_scale, t.dtype)) * tf.cast(
            positions, t.dtype
        )
        batch_shape = tf.shape(t)[: tf.rank(t) - self._event_ndims]
        return tf.fill(batch_shape, per_event)

    def _inverse_log_det_jacobian(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return self._log_det(y)

    def _forward_log_det_jacobian(self, z: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return -self._log_det(z)
