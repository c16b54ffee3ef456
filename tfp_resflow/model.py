"""`FlowModel`: a Keras model around a `tfd.TransformedDistribution` holding residual flows.

    model = FlowModel(ResidualFlowBijector(), event_shape=[2])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(dataset, epochs=10)              # minimises the mean negative log-likelihood
    model.log_prob(x); model.sample(16)

The model owns every Keras layer found in the bijector (through `tfb.Chain`, `tfb.Invert` and
this package's bijectors), so `fit` trains every weight and `.keras` files save them all. After
every optimizer step it runs the power iterations of the Lipschitz layers, so their norm
estimates follow the weights (Chen et al. do the same after each step). Learnable norm orders
(`tfp_resflow.norm_order`) get the gradient of `lipschitz.norm_order_loss` in the same step.

`model(x, training=...)` returns the per-example negative log-likelihood, in nats or in bits per
dimension (`loss_unit`); training mode uses the blocks' unbiased training estimators,
evaluation mode their evaluation estimators.
"""

import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow import bits, lipschitz, validation
from tfp_resflow.base_distribution import is_standard_normal, standard_normal
from tfp_resflow.fresh_bijector import keras_layers_of
from tfp_resflow.joint_pass import inverse_and_log_det
from tfp_resflow.modes import data_dependent_init, training_mode

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]

LOSS_UNITS = ("nats", "bits_per_dim")


class _MeanOverExamples(keras.losses.Loss):
    """Averages a per-example loss that the model already computed (`y_pred`).

    Going through `keras.losses.Loss` keeps Keras' own reduction and its scaling by the number
    of replicas under `tf.distribute`.
    """

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        del y_true
        return y_pred


@keras.saving.register_keras_serializable(package="tfp_resflow")
class FlowModel(keras.Model):
    """Density model `p(x)` of a bijector applied to a base distribution, trained by `fit`.

    Args:
        bijector: maps base samples to data (TFP's forward direction), e.g.
            `ResidualFlowBijector()` or a `tfb.Chain` containing residual flows.
        event_shape: shape of one data point, e.g. `[2]` or `[28, 28, 1]`.
        base: base distribution over `event_shape`; default a standard normal.
        loss_unit: "nats" (default) or "bits_per_dim": `bits.bits_per_dim` of the log-density,
            `(-log p(x) + D log k) / (D ln 2)` with D = prod(event_shape).
        num_levels: k, the number of discrete levels per dimension of dequantised data scaled
            to [0, 1) (256 for 8-bit images), for "bits_per_dim"; None for continuous data.
        power_iterations: power iterations per Lipschitz layer after every training step;
            None uses each layer's own default (`power_iterations` of `SpectralDense`).
        **kwargs: passed to `keras.Model` (e.g. `name`).
    """

    def __init__(
        self,
        bijector: tfb.Bijector,
        event_shape: Sequence[int],
        *,
        base: tfd.Distribution | None = None,
        loss_unit: str = "nats",
        num_levels: int | None = None,
        power_iterations: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(bijector, tfb.Bijector):
            validation.fail("bijector", "a tfb.Bijector", bijector)
        self.loss_unit = validation.choice("loss_unit", loss_unit, LOSS_UNITS)
        self.event_shape = tuple(int(d) for d in event_shape)
        self.num_levels = num_levels
        bits.bits_per_dim(0.0, math.prod(self.event_shape), num_levels)  # validates them
        self.power_iterations = validation.optional(
            validation.positive_integer, "power_iterations", power_iterations
        )
        latent_shape = bijector.inverse_event_shape(self.event_shape)
        # A given base that is the standard normal over the latent is the default one (so the
        # design card's TransformedDistribution(Sample(Normal(0, 1)), flow) saves as a config).
        self._default_base = base is None or is_standard_normal(base, latent_shape)
        if base is None:  # over the latent, whose shape may differ from the data's (as for
            # multi-scale image flows, whose latent is a vector); in the model's dtype
            base = standard_normal(latent_shape, self.compute_dtype)
        self.distribution = tfd.TransformedDistribution(base, bijector)
        self.bijector = bijector
        self._nll_loss = _MeanOverExamples(name="negative_log_likelihood")
        self.flow_layers = keras_layers_of(bijector)

    @classmethod
    def from_distribution(cls, distribution: tfd.TransformedDistribution, **kwargs: Any) -> Any:
        """Wraps an existing `tfd.TransformedDistribution` (any base, any bijector chain)."""
        return cls(
            distribution.bijector,
            event_shape=tuple(distribution.event_shape),
            base=distribution.distribution,
            **kwargs,
        )

    # -- building ----------------------------------------------------------------------------

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Creates lazily-sized layers with one pass of zeros, without data-dependent init.

        (Flows built at construction, such as `MultiscaleResidualFlow`, need no pass.)
        """
        event_shape = tuple(input_shape[1:])
        if event_shape != self.event_shape:
            raise ValueError(
                f"{self.name} models events of shape {list(self.event_shape)}; "
                f"got input shape {list(input_shape)}."
            )
        layers = keras_layers_of(self.bijector)
        if not layers or not all(layer.built for layer in layers):  # lazily sized flows
            dummy = tf.zeros([1, *self.event_shape], self.compute_dtype)
            with data_dependent_init(enabled=False), training_mode(training=False):
                self.bijector.inverse(dummy)
        self.flow_layers = keras_layers_of(self.bijector)
        for layer in self.flow_layers:
            if not layer.built:
                raise ValueError(f"{self.name}: layer {layer.name} was not built by a pass.")
        super().build(input_shape)

    def initialize(self, x: tf.Tensor) -> None:
        """Data-dependent initialisation (ActNorm) from a batch, outside any training step.

        Running it once on the first (global) batch before `fit` gives the same initial state
        under any `tf.distribute` strategy, where an in-step initialisation would see only one
        replica's share of the batch. Layers that are initialised already are left alone.
        """
        x = self._check_events(x)
        if not self.built:
            self.build((None, *self.event_shape))
        with training_mode(training=False):
            self.bijector.inverse(x)

    # -- density -----------------------------------------------------------------------------

    def _check_events(self, x: tf.Tensor) -> tf.Tensor:
        dtype = getattr(x, "dtype", None)  # arrays and tensors; Python lists take the model's
        if dtype is not None and not tf.as_dtype(dtype).is_floating:
            raise ValueError(
                f"{self.name} models floating-point data; got dtype {tf.as_dtype(dtype).name}. "
                "Cast it (images: scale to [0, 1) and dequantise, as tfp_resflow.data does)."
            )
        x = tf.convert_to_tensor(x, dtype_hint=self.compute_dtype)
        shape = tuple(x.shape[1:])
        if x.shape.rank is not None and (
            x.shape.rank != len(self.event_shape) + 1
            or any(a is not None and a != b for a, b in zip(shape, self.event_shape, strict=True))
        ):
            raise ValueError(
                f"{self.name} expects a batch of events of shape {list(self.event_shape)}; "
                f"got shape {x.shape}."
            )
        return x

    def log_prob(self, x: tf.Tensor, *, training: bool = False, seed: Any = None) -> tf.Tensor:
        """`log p(x)` in nats, shape `[batch]`; evaluation-mode log-dets unless `training`.

            log p(x) = log p_base(z) + ildj(x),   (z, ildj) = inverse_and_log_det(x)

        in one pass through the bijector (`joint_pass.inverse_and_log_det`): the same value as
        `self.distribution.log_prob(x)` for the same seed, with each residual block's `g`
        evaluated once. `seed` seeds the stochastic log-dets (None: fresh randomness).
        """
        x = self._check_events(x)
        with training_mode(training):
            z, log_det = inverse_and_log_det(
                self.bijector, x, event_ndims=len(self.event_shape), seed=seed
            )
            return self.distribution.distribution.log_prob(z) + log_det

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> tf.Tensor:
        """Per-example negative log-likelihood in `loss_unit`, shape `[batch]`."""
        log_prob = self.log_prob(x, training=bool(training))
        if self.loss_unit == "bits_per_dim":
            return bits.bits_per_dim(log_prob, math.prod(self.event_shape), self.num_levels)
        return -log_prob

    def sample(self, num_samples: int, seed: Any = None) -> tf.Tensor:
        """`num_samples` draws from the model (fixed-point inverses of the residual blocks)."""
        return self.distribution.sample(num_samples, seed=seed)

    # -- training ----------------------------------------------------------------------------

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: tf.Tensor | None = None,
        sample_weight: Any = None,
        *,
        training: bool = True,
    ) -> tf.Tensor:
        """Mean negative log-likelihood (`y_pred` from `call`), plus any added losses.

        In training, learnable norm orders add `L - stop_gradient(L)` with
        `L = lipschitz.norm_order_loss(...)`: zero in value (the reported loss stays the
        likelihood), the gradient of L for the order logits, which nothing else reaches.
        """
        del x, y
        loss = self._nll_loss(y_pred, y_pred, sample_weight=sample_weight)
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for extra in self.losses:
            loss += tf.cast(extra, loss.dtype) / num_replicas
        if training:
            order_loss = lipschitz.norm_order_loss(self.flow_layers)
            if order_loss is not None:
                # Every replica computes the same L; gradients are summed over replicas.
                order_loss = tf.cast(order_loss, loss.dtype)
                loss += (order_loss - tf.stop_gradient(order_loss)) / num_replicas
        return loss

    def make_train_function(self, force: bool = False) -> Any:  # noqa: FBT001, FBT002 (Keras')
        """Keras' train function, with the optimizer's variables created first.

        Without a distribution strategy Keras builds the optimizer inside the first traced
        step; creating variables there makes `tf.function` trace the whole step a second time
        (measured: two traces of a 12-block flow's step, ~45 s each).
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            with self.distribute_strategy.scope():
                if not self.built:
                    self.build((None, *self.event_shape))
                optimizer.build(self.trainable_variables)
        if not self.trainable_variables:  # Keras would only warn, and train nothing
            raise ValueError(
                f"{self.name} has no trainable weights. It finds the Keras layers of this "
                "package's bijectors; Keras networks inside other TFP bijectors (e.g. a "
                "tfb.RealNVP's shift_and_log_scale_fn) must be attributes of the model, set "
                "before it is built."
            )
        return super().make_train_function(force)

    def train_step(self, data: Any) -> dict:
        logs = super().train_step(data)
        self.update_lipschitz(self.power_iterations)
        return logs

    def update_lipschitz(
        self,
        power_iterations: int | None = None,
        *,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int | None = None,
    ) -> list[tf.Tensor]:
        """Runs power iterations in every Lipschitz layer; see `lipschitz.update_lipschitz`."""
        return lipschitz.update_lipschitz(
            self.flow_layers,
            power_iterations,
            atol=atol,
            rtol=rtol,
            max_iterations=max_iterations,
        )

    # -- saving ------------------------------------------------------------------------------

    def get_config(self) -> dict:
        if not self._default_base:
            raise NotImplementedError(
                f"{self.name}: a model with a custom base distribution cannot be saved as a "
                "config; save its weights with save_weights() and rebuild it in code."
            )
        return {
            **super().get_config(),
            "bijector": keras.saving.serialize_keras_object(self.bijector),
            "event_shape": list(self.event_shape),
            "loss_unit": self.loss_unit,
            "num_levels": self.num_levels,
            "power_iterations": self.power_iterations,
        }

    @classmethod
    def from_config(cls, config: dict) -> "FlowModel":
        config = dict(config)
        config["bijector"] = keras.saving.deserialize_keras_object(config["bijector"])
        return cls(**config)

    def export(
        self,
        filepath: str,
        format: str = "tf_saved_model",  # noqa: A002 (Keras' own argument name)
        *,
        verbose: bool | None = None,
        input_signature: Any = None,
        **kwargs: Any,
    ) -> None:
        """Writes a SavedModel with `log_prob(x)` (evaluation mode) and `sample(n)` endpoints."""
        if format != "tf_saved_model":
            raise ValueError(f"FlowModel.export supports format='tf_saved_model'; got {format!r}.")
        archive = keras.export.ExportArchive()
        archive.track(self)
        spec = tf.TensorSpec([None, *self.event_shape], self.compute_dtype, name="x")
        archive.add_endpoint("log_prob", lambda x: self.log_prob(x), input_signature=[spec])
        archive.add_endpoint(
            "sample",
            lambda n: self.sample(n),
            input_signature=[tf.TensorSpec([], tf.int32, name="num_samples")],
        )
        archive.write_out(filepath, verbose=bool(verbose))
