"""`FlowModel`: a Keras model around a `tfd.TransformedDistribution` holding residual flows.

    model = FlowModel(ResidualFlowBijector(), event_shape=[2])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(dataset, epochs=10)              # minimises the mean negative log-likelihood
    model.log_prob(x); model.sample(16)

The model owns every Keras layer found in the bijector (through `tfb.Chain`, `tfb.Invert` and
this package's bijectors), so `fit` trains every weight and `.keras` files save them all. After
every optimizer step it runs the power iterations of the Lipschitz layers, so their norm
estimates follow the weights (Chen et al. do the same after each step). Learnable norm orders
(`tfp_resflow.layers.norm_order`) get the gradient of `lipschitz.norm_order_loss` in the same step.

A conditional model `p(x | c)` (`context_shape=[K]`, around a bijector built with a
`context_size`) trains on `(x, c)` pairs, from a `tf.data.Dataset` of pairs or `fit(x, c)` or
`fit((x, c))`; `log_prob(x, context=c)` and `sample(n, context=c)` take the context, and the
bijector's conditional members get it through `context.conditional_kwargs`.

`model(x, training=...)` returns the per-example negative log-likelihood, in nats or in bits per
dimension (`loss_unit`); training mode uses the blocks' unbiased training estimators,
evaluation mode their evaluation estimators.
"""

import math
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors import certification
from tfp_resflow.bijectors.fresh_bijector import keras_layers_of
from tfp_resflow.bijectors.joint_pass import inverse_and_log_det
from tfp_resflow.core import validation
from tfp_resflow.core.context import conditional_kwargs, context_sizes
from tfp_resflow.core.modes import data_dependent_init, training_mode
from tfp_resflow.layers import lipschitz
from tfp_resflow.models import bits
from tfp_resflow.models.base_distribution import is_standard_normal, standard_normal

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = ["FlowModel"]

LOSS_UNITS = ("nats", "bits_per_dim")
# `sample` turns its seed into a stateless one with this salt: the same seed and salt give the
# same draws through TFP's own `distribution.sample` (benchmarks/solver.py counts with it).
SAMPLE_SEED_SALT = "FlowModel.sample"


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
        context_shape: `[K]` for a conditional model p(x | c) with context vectors of size K;
            None (default) for p(x).
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
        context_shape: Sequence[int] | None = None,
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
        self.context_shape = _check_context_shape(context_shape, bijector)
        self.distribution = tfd.TransformedDistribution(base, bijector)
        self.bijector = bijector
        self._nll_loss = _MeanOverExamples(name="negative_log_likelihood")
        self._traced_sample: Any = None  # `sample`'s tf.function, made at its first call
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

        (Flows built at construction, such as `MultiscaleResidualFlow`, need no pass.) A
        conditional model takes the shape of x, or the shapes of `(x, c)`.
        """
        if input_shape and isinstance(input_shape[0], Sequence | tf.TensorShape):
            input_shape = input_shape[0]  # (x, c): Keras builds from the call's input
        input_shape = tuple(input_shape)
        event_shape = tuple(input_shape[1:])
        if event_shape != self.event_shape:
            raise ValueError(
                f"{self.name} models events of shape {list(self.event_shape)}; "
                f"got input shape {list(input_shape)}."
            )
        layers = keras_layers_of(self.bijector)
        if not layers or not all(layer.built for layer in layers):  # lazily sized flows
            dummy = tf.zeros([1, *self.event_shape], self.compute_dtype)
            kwargs = self._bijector_kwargs(self._dummy_context())
            with data_dependent_init(enabled=False), training_mode(training=False):
                self.bijector.inverse(dummy, **kwargs)
        self.flow_layers = keras_layers_of(self.bijector)
        for layer in self.flow_layers:
            if not layer.built:
                raise ValueError(f"{self.name}: layer {layer.name} was not built by a pass.")
        super().build(input_shape)

    def initialize(self, x: tf.Tensor, context: tf.Tensor | None = None) -> None:
        """Data-dependent initialisation (ActNorm) from a batch, outside any training step.

        Running it once on the first (global) batch before `fit` gives the same initial state
        under any `tf.distribute` strategy, where an in-step initialisation would see only one
        replica's share of the batch. Layers that are initialised already are left alone. A
        conditional model needs the batch's contexts.
        """
        x = self._check_events(x)
        kwargs = self._bijector_kwargs(context)
        if not self.built:
            self.build(self.input_shape_for_build())
        with training_mode(training=False):
            self.bijector.inverse(x, **kwargs)

    # -- the context -------------------------------------------------------------------------

    def input_shape_for_build(self) -> tuple:
        """`(None, *event_shape)`, or for a conditional model the pair of x's and c's shapes."""
        x_shape = (None, *self.event_shape)
        if self.context_shape is None:
            return x_shape
        return (x_shape, (None, *self.context_shape))

    @property
    def _default_save_signature(self) -> Any:
        # Keras' SavedModel signature calls the model on inputs of the shapes given to `build`,
        # which for a conditional model is often x's alone (`model.build((None, D))`); its
        # input is the pair (x, c).
        if self.context_shape is None:
            return super()._default_save_signature
        x = tf.TensorSpec([None, *self.event_shape], self.compute_dtype)
        c = tf.TensorSpec([None, *self.context_shape], self.compute_dtype)

        @tf.function(input_signature=[(x, c)])
        def serving_default(inputs: tuple) -> tf.Tensor:
            return self(inputs)

        return serving_default

    def _dummy_context(self) -> tf.Tensor | None:
        if self.context_shape is None:
            return None
        return tf.zeros([1, *self.context_shape], self.compute_dtype)

    def _bijector_kwargs(self, context: Any) -> dict:
        """The bijector's keyword arguments for `context` (checked against `context_shape`)."""
        if self.context_shape is None:
            if context is not None:
                raise ValueError(
                    f"{self.name} models p(x) and takes no context; build a conditional "
                    "model with FlowModel(..., context_shape=[K]) and a bijector with a "
                    "context_size."
                )
            return {}
        k = self.context_shape[0]
        if context is None:
            raise ValueError(
                f"{self.name} models p(x | c): pass context=c of shape [batch, {k}] (one per "
                f"example) or [{k}] (one for all)."
            )
        context = tf.convert_to_tensor(context, dtype_hint=self.compute_dtype)
        if context.shape.rank == 0 or (
            context.shape.rank is not None and context.shape[-1] not in (None, k)
        ):
            raise ValueError(
                f"{self.name} takes contexts of shape [batch, {k}] or [{k}]; got shape "
                f"{context.shape}."
            )
        if not context.dtype.is_floating:
            context = tf.cast(context, self.compute_dtype)
        return conditional_kwargs(self.bijector, context)

    def _split(self, inputs: Any) -> tuple[Any, Any]:
        """`(x, c)` of a conditional model's input, `(x, None)` of an unconditional one's."""
        pair = isinstance(inputs, tuple | list) and len(inputs) == 2
        if self.context_shape is None:
            return inputs, None
        if not pair:
            raise ValueError(
                f"{self.name} models p(x | c); its input is the pair (x, c), c of shape "
                f"[batch, {self.context_shape[0]}]."
            )
        return inputs[0], inputs[1]

    def _pair_up(self, data: Any) -> Any:
        """Keras' data `(x, c)` (a data set of pairs, `fit(x, c)`) as the input `(x, c)`.

        Keras reads a pair as `(inputs, targets)`; a conditional model has no targets, so the
        second element is the context (`fit((x, c))` already gives the pair as the input).
        """
        if self.context_shape is None:
            return data
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is not None and not isinstance(x, tuple | list):
            x, y = (x, y), None
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

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

    def log_prob(
        self,
        x: tf.Tensor,
        *,
        context: tf.Tensor | None = None,
        training: bool = False,
        seed: Any = None,
        certified: bool = False,
    ) -> tf.Tensor:
        """`log p(x)` (`log p(x | c)`) in nats, `[batch]`; evaluation log-dets unless `training`.

            log p(x) = log p_base(z) + ildj(x),   (z, ildj) = inverse_and_log_det(x)

        in one pass through the bijector (`joint_pass.inverse_and_log_det`): the same value as
        `self.distribution.log_prob(x)` for the same seed, with each residual block's `g`
        evaluated once. `seed` seeds the stochastic log-dets (None: fresh randomness). A
        conditional model needs `context`, `[batch, K]` or `[K]`. `certified=True` first
        refuses a model whose blocks are not all certified below 1 (`require_certified`).
        """
        if certified:
            self.require_certified()
        x = self._check_events(x)
        kwargs = self._bijector_kwargs(context)
        with training_mode(training):
            z, log_det = inverse_and_log_det(
                self.bijector, x, event_ndims=len(self.event_shape), seed=seed, **kwargs
            )
            return self.distribution.distribution.log_prob(z) + log_det

    def call(self, x: Any, *, training: bool | None = None) -> tf.Tensor:
        """Per-example negative log-likelihood in `loss_unit`, shape `[batch]`.

        `x` is a batch of events, or for a conditional model the pair `(x, c)`.
        """
        x, context = self._split(x)
        log_prob = self.log_prob(x, context=context, training=bool(training))
        if self.loss_unit == "bits_per_dim":
            return bits.bits_per_dim(log_prob, math.prod(self.event_shape), self.num_levels)
        return -log_prob

    def sample(
        self,
        num_samples: int,
        seed: Any = None,
        *,
        context: tf.Tensor | None = None,
        certified: bool = False,
    ) -> tf.Tensor:
        """`num_samples` draws from the model (fixed-point inverses of the residual blocks).

        A conditional model draws from p(x | c): `context` `[num_samples, K]` (one per sample)
        or `[K]` (one for all). `certified=True` first refuses a model whose blocks are not all
        certified below 1 (`require_certified`).
        """
        if certified:
            self.require_certified()
        kwargs = self._bijector_kwargs(context)
        # The seed becomes a stateless `[2]` tensor here, as TFP's `sample` would make it, so
        # that one trace serves every seed.
        seed = tfp.random.sanitize_seed(seed, salt=SAMPLE_SEED_SALT)
        if not tf.executing_eagerly():
            return self._sample_graph(num_samples, seed, kwargs)
        # Eagerly, TFP walks the bijectors op by op between the blocks' traced solves: 2/3 of
        # the time of 64 samples of the `digits` model (cProfile). One traced function per
        # sample size (and context shape) serves every later call.
        if not self.built:  # variables made inside the trace would make it trace twice
            self.build(self.input_shape_for_build())
        if self._traced_sample is None:
            self._traced_sample = tf.function(self._sample_graph, autograph=False)
        return self._traced_sample(num_samples, seed, kwargs)

    def _sample_graph(self, num_samples: Any, seed: tf.Tensor, kwargs: dict) -> tf.Tensor:
        if not kwargs:
            return self.distribution.sample(num_samples, seed=seed)
        return self.distribution.sample(num_samples, seed=seed, bijector_kwargs=kwargs)

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
                    self.build(self.input_shape_for_build())
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
        logs = super().train_step(self._pair_up(data))
        self.update_lipschitz(self.power_iterations)
        return logs

    def test_step(self, data: Any) -> dict:
        return super().test_step(self._pair_up(data))

    def predict_step(self, data: Any) -> Any:
        return super().predict_step(self._pair_up(data))

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

    def certify(self) -> list[float]:
        """A guaranteed upper bound on `Lip(g)` for every residual block, data -> latent.

        Python floats (`certification.certify`): a block whose bound is below 1 is invertible
        and its log-det series converges. Call it after `update_lipschitz` to a tolerance (as
        evaluation does) and with the weights to be used (e.g. the EMA weights); eager only.
        """
        if tf.inside_function():
            raise RuntimeError(
                "FlowModel.certify reads the weights' values: call it eagerly, outside "
                "tf.function (e.g. before an evaluation loop)"
            )
        return certification.certify(self.bijector)

    def require_certified(self) -> list[float]:
        """`certify()`, raising `ValueError` if a block is not certified below 1.

        Raises:
            ValueError: Naming the blocks and their bounds.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", certification.CertificationWarning)
            bounds = self.certify()
        failing = certification.uncertified_blocks(bounds)
        if failing:
            listed = ", ".join(f"block {i}: {bounds[i]:.4g}" for i in failing)
            raise ValueError(
                f"the model is not certified invertible: Lip(g) bounds not below 1 ({listed}); "
                "run update_lipschitz to a tolerance, or lower the Lipschitz constant"
            )
        return bounds

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
            "context_shape": None if self.context_shape is None else list(self.context_shape),
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
        """Writes a SavedModel with `log_prob(x)` (evaluation mode) and `sample(n)` endpoints.

        A conditional model's endpoints are `log_prob(x, context)` and `sample(n, context)`,
        the context `[batch, K]` (for `sample`, `[num_samples, K]` or `[1, K]` for one for all).
        """
        if format != "tf_saved_model":
            raise ValueError(f"FlowModel.export supports format='tf_saved_model'; got {format!r}.")
        archive = keras.export.ExportArchive()
        archive.track(self)
        spec = tf.TensorSpec([None, *self.event_shape], self.compute_dtype, name="x")
        count = tf.TensorSpec([], tf.int32, name="num_samples")
        if self.context_shape is None:
            archive.add_endpoint("log_prob", lambda x: self.log_prob(x), input_signature=[spec])
            archive.add_endpoint("sample", lambda n: self.sample(n), input_signature=[count])
        else:
            context = tf.TensorSpec([None, *self.context_shape], self.compute_dtype, "context")
            archive.add_endpoint(
                "log_prob",
                lambda x, c: self.log_prob(x, context=c),
                input_signature=[spec, context],
            )
            archive.add_endpoint(
                "sample",
                lambda n, c: self.sample(n, context=c),
                input_signature=[count, context],
            )
        archive.write_out(filepath, verbose=bool(verbose))


def _check_context_shape(context_shape: Any, bijector: tfb.Bijector) -> tuple[int] | None:
    """`(K,)` for a conditional model, else None.

    A bijector with a member of this package built with a `context_size` needs a context;
    TFP's `MaskedAutoregressiveFlow` and `RealNVP` members may take one (their networks
    decide), so they allow a `context_shape` without requiring it.
    """
    sizes = context_sizes(bijector)
    ours = {s for s in sizes if s is not None}
    if context_shape is None:
        if ours:
            raise ValueError(
                f"the bijector is conditional (context_size={sorted(ours)[0]}); pass "
                "context_shape=[K], the shape of one context vector."
            )
        return None
    if isinstance(context_shape, str) or not isinstance(context_shape, Sequence):
        validation.fail("context_shape", "[K], the shape of one context vector", context_shape)
    if len(context_shape) != 1:
        validation.fail("context_shape", "[K] (contexts are vectors)", context_shape)
    size = validation.positive_integer("context_shape[0]", context_shape[0])
    if not sizes:
        raise ValueError(
            f"context_shape={list(context_shape)} needs a conditional bijector (e.g. "
            f"ResidualFlowBijector(context_size={size})); this one takes no context."
        )
    if ours and ours != {size}:
        raise ValueError(
            f"context_shape={list(context_shape)} does not match the bijector's context_size "
            f"{sorted(ours)}."
        )
    return (size,)
