"""`ResidualBlock`: one invertible residual map as a TFP bijector.

Direction (TFP's `forward` is base -> data):

    inverse(y) = y + g(y)                 data -> latent: cheap, used by `log_prob`
    inverse_log_det_jacobian(y) = log|det(I + J_g(y))|   from a `logdet` estimator
    forward(z) = the x with x + g(x) = z  latent -> data: a fixed-point solve, used by `sample`

so `log_prob` never solves anything. The block holds `g` (any callable; usually a Keras layer,
whose variables the block exposes to `tf.Module` tracking so `trainable_variables` is complete)
and a `config.BlockConfig` (its estimators and solver).

The fixed-point inverse has an implicit gradient (`tfp_resflow.solvers.solver`): for `z = x + g(x)`,
`dx/dz = (I + J_g(x))^-1`, computed by a second fixed-point solve on vectors, instead of
backpropagating through the iterations.

A conditional block (`context_size=K`, with a `g` of `[x, c]` such as
`network.lipschitz_mlp(D, context_size=K)`) models `x + g(x, c)`: every method takes
`conditional_input=c` of shape `[..., K]` (TFP's convention), broadcast to the batch shape of its
input. For each c, `Lip_x(g(., c)) < 1`, so the block stays invertible in x.

The estimator is chosen per call by `modes.training_mode`: training uses the unbiased estimator
with the Neumann gradient; evaluation uses the exact log-det for small events or the roulette with
20 exact terms (as the authors evaluate), without rebuilding anything.
"""

import threading
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tfp_resflow.bijectors.block_functions import BlockFunctions, block_functions
from tfp_resflow.bijectors.density_pass import SharedDensityPass
from tfp_resflow.bijectors.fresh_bijector import FreshBijector
from tfp_resflow.configs.config_fields import with_fields
from tfp_resflow.configs.flow_configs import BlockConfig
from tfp_resflow.core.context import check_context_size, flatten_context

# Re-exported: the modes are used wherever blocks are.
from tfp_resflow.core.modes import data_dependent_init, is_training, training_mode
from tfp_resflow.estimators import logdet
from tfp_resflow.solvers import solver

__all__ = ["ResidualBlock", "data_dependent_init", "is_training", "training_mode"]


class ResidualBlock(SharedDensityPass, FreshBijector):
    """Invertible residual block `x + g(x)` with `Lip(g) < 1`, as a TFP bijector.

        inverse(y) = y + g(y)                             (data -> latent)
        inverse_log_det_jacobian(y) = log|det(I + J_g(y))|
        inverse_and_log_det(y) = both, with g evaluated once
        forward(z) = x  such that  x + g(x) = z           (latent -> data)

    The forward map solves `x + g(x) = z` with the config's solver (plain iteration
    `x <- z - g(x)` from `x = z - g(z)`, converging geometrically at rate `Lip(g)`, or Anderson
    acceleration) until every element moves by at most `atol + rtol * |z|`, or `max_iterations`
    is reached. If it does not converge, the block raises an
    `InvalidArgumentError` giving the largest residual `|x + g(x) - z|` (with
    `on_nonconvergence="raise"`), and the unconverged examples are returned as NaN in any case
    (XLA drops assertions; a NaN sample cannot pass for a real one).

    When `g` is a built Keras layer, each pass runs as a traced function of `g`'s weights that
    is shared by every block whose `g` has the same structure (`block_functions`): a deep flow
    traces and compiles each kind of block once.

    Args:
        residual_fn: `g`, mapping `[batch, *event]` to the same shape with `Lip(g) < 1`.
        config: the block's estimators and solver (`config.BlockConfig`; default: the
            authors' block, the unbiased roulette with geometric(0.5) extra terms).
        event_ndims: 1 for vector events `[D]`, 3 for image events `[H, W, C]`.
        context_size: K for a conditional block, whose `g` is called as `g([x, c])` with
            `c` of shape `[batch, K]`; None (default) for `g(x)`.
        validate_args: check inputs for NaN/inf.
        name: name scope.
        **fields: `BlockConfig` fields replacing those of `config`, e.g.
            `ResidualBlock(g, log_det="exact")` or `ResidualBlock(g, solver="anderson")`.

    Raises:
        ValueError: for a bad field value (naming it), a `residual_fn` that is not callable or
            an `event_ndims` other than 1 or 3.
    """

    def __init__(
        self,
        residual_fn: Callable[[tf.Tensor], tf.Tensor],
        config: BlockConfig | None = None,
        *,
        event_ndims: int = 1,
        context_size: int | None = None,
        validate_args: bool = False,
        name: str = "residual_block",
        **fields: Any,
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            if not callable(residual_fn):
                raise ValueError(f"residual_fn must be callable; got {residual_fn!r}.")
            if event_ndims not in (1, 3):
                raise ValueError(f"event_ndims must be 1 or 3; got {event_ndims!r}.")
            config = BlockConfig() if config is None else config
            if not isinstance(config, BlockConfig):
                raise ValueError(f"config must be a BlockConfig; got {config!r}.")
            self._residual_fn = residual_fn
            self._event_ndims = event_ndims
            self._context_size = check_context_size("context_size", context_size)
            self._config = with_fields(config, **fields)
            self._functions: BlockFunctions | None = None
            self._recent = threading.local()  # latest inverse pair, for warm starts
            super().__init__(
                forward_min_event_ndims=event_ndims,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    @property
    def config(self) -> BlockConfig:
        """The block's estimators and solver."""
        return self._config

    @property
    def context_size(self) -> int | None:
        """K for a conditional block (`conditional_input` of shape `[..., K]`), else None."""
        return self._context_size

    @property
    def residual_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """`g`, the residual branch."""
        return self._residual_fn

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        return [self._residual_fn] if isinstance(self._residual_fn, keras.layers.Layer) else []

    def log_det_fn(self, *, training: bool, event_size: int) -> logdet.LogDetFn:
        """The estimator used in the given mode for events of `event_size` dimensions."""
        return self._config.estimator(training=training, event_size=event_size)

    # -- shape plumbing: the estimators and g take [batch, *event] -------------------------------

    def _flatten_batch(self, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(t)
        batch_shape = shape[: tf.rank(t) - self._event_ndims]
        event_shape = shape[tf.rank(t) - self._event_ndims :]
        flat = tf.reshape(t, tf.concat([[-1], event_shape], axis=0))
        if t.shape.rank is not None:  # keep static event dims for layers that need them
            flat = tf.ensure_shape(flat, [None, *t.shape[t.shape.rank - self._event_ndims :]])
        return flat, batch_shape

    def _passes(self) -> BlockFunctions:
        """The block's passes: traced (and shared) once `g` is a built Keras layer."""
        could_trace = self._config.traceable and isinstance(self._residual_fn, keras.layers.Layer)
        if self._functions is None or (could_trace and not self._functions.traced):
            self._functions = block_functions(self._residual_fn, self._config)
            self._track_keras_variables()
        return self._functions

    def _check_input(self, t: tf.Tensor, name: str) -> tf.Tensor:
        if t.shape.rank is not None and t.shape.rank < self._event_ndims:
            raise ValueError(
                f"{self.name}: {name} must have at least {self._event_ndims} dimensions "
                f"(the event); got shape {t.shape}."
            )
        return self._check_values(t, name)

    def _value(self, y: tf.Tensor, context: tf.Tensor | None) -> tf.Tensor:
        return self._passes().value(self._residual_fn, y, context)

    def _flat_context(self, context: Any, t: tf.Tensor, batch_shape: tf.Tensor) -> tf.Tensor | None:
        return flatten_context(
            context, batch_shape, self._context_size, owner=self.name, dtype=t.dtype
        )

    # -- TFP hooks ---------------------------------------------------------------------------------

    def _inverse_and_log_det(
        self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        y = self._check_input(y, "y")
        flat, batch_shape = self._flatten_batch(y)
        context = self._flat_context(conditional_input, y, batch_shape)
        x, log_det = self._passes().joint(
            self._residual_fn, flat, seed, training=is_training(), context=context
        )
        self._track_keras_variables()  # g may have been built by this call
        self._record_inverse(flat, x, context)
        return tf.reshape(x, tf.shape(y)), tf.reshape(log_det, batch_shape)

    def _inverse(self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None) -> tf.Tensor:
        # Inside `TransformedDistribution.log_prob`: the joint pass, its log-det kept for the
        # density correction that follows (`tfp_resflow.bijectors.density_pass`).
        x = self._inverse_for_density(y, seed=seed, conditional_input=conditional_input)
        if x is not None:
            return x
        y = self._check_input(y, "y")
        flat, batch_shape = self._flatten_batch(y)
        context = self._flat_context(conditional_input, y, batch_shape)
        x = self._value(flat, context)
        self._track_keras_variables()
        self._record_inverse(flat, x, context)
        return tf.reshape(x, tf.shape(y))

    def _inverse_log_det_jacobian(
        self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None
    ) -> tf.Tensor:
        return self._inverse_and_log_det(y, seed=seed, conditional_input=conditional_input)[1]

    def _forward(self, z: tf.Tensor, seed: Any = None, conditional_input: Any = None) -> tf.Tensor:
        y = self._recorded_forward(z, seed=seed, conditional_input=conditional_input)
        if y is not None:  # z is the output of a joint pass of this density computation
            return y
        z = self._check_input(z, "z")
        flat, batch_shape = self._flatten_batch(z)
        context = self._flat_context(conditional_input, z, batch_shape)
        passes = self._passes()
        start = self._warm_start_for(flat, context)
        x, converged = passes.solve(self._residual_fn, flat, start, context)
        x = self._report_nonconvergence(x, converged > 0.5, flat, context)
        return tf.reshape(x, tf.shape(z))

    # -- warm starts: TFP asks for forward(inverse(y)) in every log_prob ------------------------

    def _record_inverse(self, y: tf.Tensor, x: tf.Tensor, context: tf.Tensor | None) -> None:
        """Remembers this thread's latest eager inverse pair (graphs have the value cache)."""
        if tf.executing_eagerly():
            self._recent.pair = (y, x, context)

    def _warm_start_for(self, z: tf.Tensor, context: tf.Tensor | None) -> tf.Tensor | None:
        """The recorded `y` of the latest eager inverse, to start the fixed-point iteration.

        Any start converges (the map is a contraction); when `z` is that inverse's output, as in
        TFP's density correction `fldj(inverse(y))`, the iteration stops after one step. It is
        a starting point, not a cached answer, so it cannot be stale (a conditional block
        takes it only for an equal context: another context has another inverse).
        """
        pair = getattr(self._recent, "pair", None)
        if not tf.executing_eagerly() or pair is None:
            return None
        y, _, recorded = pair
        if y.dtype != z.dtype or y.shape != z.shape or not _same_context(recorded, context):
            return None
        return y

    def _report_nonconvergence(
        self, x: tf.Tensor, converged: tf.Tensor, z: tf.Tensor, context: tf.Tensor | None
    ) -> tf.Tensor:
        """Raises (unless `on_nonconvergence="nan"`) and NaN-fills unconverged examples.

        An input with NaN or inf has no inverse: that is reported as such, not as a solver
        failure (TFP's `log_prob` reaches this solve through its density correction). The
        residual (one more evaluation of g) is computed only when something failed.
        """
        config = self._config
        if config.on_nonconvergence == "raise":
            finite = tf.reduce_all(tf.math.is_finite(tf.reshape(z, [tf.shape(z)[0], -1])), axis=1)
            input_check = tf.debugging.Assert(
                tf.reduce_all(finite),
                [
                    f"{self.name}: the input to the inverse of the block has NaN or inf in",
                    tf.reduce_sum(tf.cast(~finite, tf.int32)),
                    "examples; it has no inverse. Check the data given to log_prob, inverse or "
                    "sample (validate_args=True checks them where they enter).",
                ],
            )
            with tf.control_dependencies([input_check]):
                all_converged = tf.reduce_all(converged)
            residual = tf.cond(
                all_converged,
                lambda: tf.zeros([], x.dtype),
                lambda: tf.reduce_max(tf.abs(self._value(tf.stop_gradient(x), context) - z)),
            )
            tolerances = solver.tolerances(x.dtype, config.atol, config.rtol)
            check = tf.debugging.Assert(
                all_converged,
                [
                    f"{self.name}: the fixed-point inverse did not converge within "
                    f"{config.max_iterations} iterations (tolerances {tolerances}); "
                    "largest residual:",
                    residual,
                    "examples not converged:",
                    tf.reduce_sum(tf.cast(~converged, tf.int32)),
                ],
                summarize=1,
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        return solver.nan_unless(converged, x)


def _same_context(a: tf.Tensor | None, b: tf.Tensor | None) -> bool:
    """Whether two eager flat contexts are equal (both None for unconditional blocks)."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(tf.reduce_all(a == b))
