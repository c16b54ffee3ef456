"""`ResidualBlock`: one invertible residual map as a TFP bijector.

Direction (TFP's `forward` is base -> data):

    inverse(y) = y + g(y)                 data -> latent: cheap, used by `log_prob`
    inverse_log_det_jacobian(y) = log|det(I + J_g(y))|   from a `logdet` estimator
    forward(z) = the x with x + g(x) = z  latent -> data: fixed-point iteration, used by `sample`

so `log_prob` never solves anything. The block holds `g` (any callable; usually a Keras layer,
whose variables the block exposes to `tf.Module` tracking so `trainable_variables` is complete).

Two TFP behaviours are changed on purpose:

- TFP caches bijector results by tensor identity. In eager mode that cache returns values from
  before a variable update when the same input tensor is reused, and it freezes a stochastic
  log-det per tensor. Here results are cached only while tracing a graph (where every trace has
  fresh tensors and variables are read at run time), and log-dets are never cached, so every call
  is a fresh estimate.
- The fixed-point inverse has an implicit gradient: for `z = x + g(x)`,
  `dx/dz = (I + J_g(x))^-1`, computed by a second fixed-point iteration on vectors, instead of
  backpropagating through the iterations.

The estimator is chosen per call by `training_mode`: training uses the unbiased estimator with
the Neumann gradient; evaluation uses the exact log-det for small events or the roulette with 20
exact terms (as the authors evaluate), without rebuilding anything.
"""

import contextlib
import numbers
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tfp_resflow import logdet, solver
from tfp_resflow.block_functions import BlockFunctions, BlockSettings, block_functions

# Re-exported here, where they were defined before the estimators and the solver moved out.
from tfp_resflow.logdet import (
    EVAL_EXACT_MAX_EVENT_SIZE,
    EVAL_NUM_EXACT_TERMS,
    make_log_det_fn,
)
from tfp_resflow.solver import DEFAULT_TOLERANCE

tfb = tfp.bijectors

__all__ = [
    "DEFAULT_TOLERANCE",
    "EVAL_EXACT_MAX_EVENT_SIZE",
    "EVAL_NUM_EXACT_TERMS",
    "ResidualBlock",
    "data_dependent_init",
    "is_training",
    "make_log_det_fn",
    "training_mode",
]


# ------------------------------------------------------------------------------------------------
# Per-call modes, read at call (or trace) time: thread-local, so threads do not see each other's.

_MODES = threading.local()


def _mode(name: str, *, default: bool) -> bool:
    stack = getattr(_MODES, name, None)
    return stack[-1] if stack else default


@contextlib.contextmanager
def _push_mode(name: str, *, value: bool) -> Iterator[None]:
    stack = getattr(_MODES, name, None)
    if stack is None:
        stack = []
        setattr(_MODES, name, stack)
    stack.append(bool(value))
    try:
        yield
    finally:
        stack.pop()


def training_mode(training: bool) -> contextlib.AbstractContextManager:  # noqa: FBT001 (a mode)
    """Context manager selecting the log-det estimator of every residual block called inside.

    `training=True` (also the default outside any context) selects each block's training
    estimator, `training=False` its evaluation estimator. Under `tf.function` the mode is read
    at trace time, so trace training and evaluation in separate functions (as Keras does).

    Example:
        with tfp_resflow.training_mode(False):
            log_p = distribution.log_prob(x)   # evaluation-mode log-dets
    """
    return _push_mode("training", value=training)


def is_training() -> bool:
    """Whether residual blocks currently use their training estimator (default True)."""
    return _mode("training", default=True)


def data_dependent_init(enabled: bool) -> contextlib.AbstractContextManager:  # noqa: FBT001 (a mode)
    """Context manager enabling (default) or suppressing data-dependent initialisation.

    `FlowModel.build` traces the flow on dummy zeros inside `data_dependent_init(False)`, so
    that `ActNorm` initialises from the first real batch instead.
    """
    return _push_mode("data_init", value=enabled)


def data_dependent_init_enabled() -> bool:
    """Whether layers with data-dependent initialisation may initialise now."""
    return _mode("data_init", default=True)


# ------------------------------------------------------------------------------------------------
# The cache: fresh in eager mode, shared within one traced graph, never for log-dets.


class _GraphOnlyCache(cache_util.BijectorCache):
    """Caches forward/inverse values only for inputs of the graph being traced now.

    - Eager: no caching (TFP's cache would serve results computed before a variable update).
      `ResidualBlock` instead warm-starts its fixed-point solve from its latest inverse pair,
      so TFP's `log_prob` path (which asks for `forward(inverse(y))`) stays cheap.
    - Graph: caching is safe (fresh symbolic tensors per trace, variables read at run time) and
      lets `sample` + `log_prob` in one `tf.function` skip the fixed-point solve.
    - Inputs from another graph (Keras traces `call` in a scratch graph with the real input
      tensors) are not cached, so no scratch-graph tensor can leak into the real graph.
    - Entries are keyed by replica context too: replicas of a `tf.distribute` strategy traced
      into one graph may share an input tensor, and a value computed with one replica's copy of
      the variables would carry no gradient to another's.
    - Attributes (where TFP stores log-dets) are always fresh, so each call re-estimates.
    """

    _REPLICA_KEY = "_tfp_resflow_replica"

    def _lookup(self, input: Any, forward_name: str, inverse_name: str, **kwargs: Any) -> Any:  # noqa: A002
        graph = getattr(input, "graph", None)
        if tf.executing_eagerly() or graph is not tf.compat.v1.get_default_graph():
            return getattr(self.bijector, forward_name)(input, **kwargs)
        kwargs[self._REPLICA_KEY] = id(tf.distribute.get_replica_context())
        return super()._lookup(input, forward_name, inverse_name, **kwargs)

    def _invoke(self, input: Any, fn_name: str, kwargs: dict, attributes: dict) -> Any:  # noqa: A002
        kwargs = {k: v for k, v in kwargs.items() if k != self._REPLICA_KEY}
        return getattr(self.bijector, fn_name)(input, **kwargs)

    def _attributes(self, input: Any, fn_name: str, **kwargs: Any) -> dict:  # noqa: A002
        return {}


class FreshBijector(tfb.Bijector):
    """Base class for this package's bijectors: TFP's contract with the `_GraphOnlyCache`.

    Subclasses that hold Keras layers list them in `keras_layers`; their variables are mirrored
    into a `tf.Module`-visible attribute, so `trainable_variables` and `variables` (of this
    bijector and of any `tfb.Chain` or `tfd.TransformedDistribution` holding it) are complete.
    """

    _cache = _GraphOnlyCache()

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        """The Keras layers whose weights this bijector uses (built or not)."""
        return []

    def _track_keras_variables(self) -> None:
        # tf.Module walks attributes for tf.Variables; Keras 3 layers are not tf.Modules and
        # keras.Variable is not a tf.Variable, so expose the underlying tf.Variables (`.value`).
        tracked = [w.value for layer in self.keras_layers if layer.built for w in layer.weights]
        self._tracked_keras_variables = tracked

    def inverse_and_log_det(
        self,
        y: tf.Tensor,
        *,
        event_ndims: int | None = None,
        seed: Any = None,
        name: str = "inverse_and_log_det",
        **kwargs: Any,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """`(inverse(y), inverse_log_det_jacobian(y, event_ndims))` in one pass.

        Equal to the two calls for the same `seed`; each residual block evaluates `g` once (its
        log-det estimator's `g(y)` is the value), so training does the forward work once and
        keeps one block's activations at a time (see `tfp_resflow.block_functions`).

        Args:
            y: data-side tensor `[..., *event]`.
            event_ndims: rank of the events the log-det is summed over; default (and minimum)
                `inverse_min_event_ndims`, as TFP.
            seed: seed of the stochastic log-det estimates (None: fresh randomness).
            name: name scope.
            **kwargs: passed to the implementation, as TFP's `**kwargs`.

        Returns:
            `(x, ildj)`: the latent-side tensor and the log-det, of the batch shape of `y`.
        """
        with self._name_and_control_scope(name):
            y = tf.convert_to_tensor(y, dtype_hint=self.dtype, name="y")
            minimum = self.inverse_min_event_ndims
            if event_ndims is None:
                event_ndims = minimum
            if isinstance(event_ndims, bool) or not isinstance(event_ndims, numbers.Integral):
                raise ValueError(f"event_ndims must be an integer; got {event_ndims!r}.")
            event_ndims = int(event_ndims)
            if event_ndims < minimum:
                raise ValueError(
                    f"{self.name}: event_ndims must be at least {minimum}; got {event_ndims}."
                )
            if seed is not None:
                kwargs["seed"] = seed
            x, log_det = self._inverse_and_log_det(y, **kwargs)
            if event_ndims > minimum:
                log_det = tf.reduce_sum(log_det, axis=list(range(minimum - event_ndims, 0)))
            return x, log_det

    def _inverse_and_log_det(self, y: tf.Tensor, **kwargs: Any) -> tuple[tf.Tensor, tf.Tensor]:
        # Default: the two calls. Subclasses that can share work override this.
        minimum = self.inverse_min_event_ndims
        return (
            self.inverse(y, **kwargs),
            self.inverse_log_det_jacobian(y, event_ndims=minimum, **kwargs),
        )

    def _check_finite(self, t: tf.Tensor, name: str) -> tf.Tensor:
        """With `validate_args`, `t` behind a run-time check that it has no NaN or inf."""
        if self.validate_args:
            t = tf.debugging.assert_all_finite(t, f"{self.name}: {name} has NaN or inf.")
        return t

    @classmethod
    def _parameter_properties(cls, dtype: tf.DType, num_classes: Any = None) -> dict:
        return {}  # Weights live in Keras layers and carry no batch shape.


# ------------------------------------------------------------------------------------------------
# The block.


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.")
    return float(value)


def _options(options: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(dict(options or {}).items()))


class ResidualBlock(FreshBijector):
    """Invertible residual block `x + g(x)` with `Lip(g) < 1`, as a TFP bijector.

        inverse(y) = y + g(y)                             (data -> latent)
        inverse_log_det_jacobian(y) = log|det(I + J_g(y))|
        inverse_and_log_det(y) = both, with g evaluated once
        forward(z) = x  such that  x + g(x) = z           (latent -> data)

    The forward map iterates `x <- z - g(x)` from `x = z - g(z)` until every element moves by
    at most `atol + rtol * |z|`, or `max_iterations` is reached; the iteration converges
    geometrically at rate `Lip(g)`. If it does not converge, the block raises an
    `InvalidArgumentError` giving the largest residual `|x + g(x) - z|` (with
    `on_nonconvergence="raise"`), and the unconverged examples are returned as NaN in any case
    (XLA drops assertions; a NaN sample cannot pass for a real one).

    When `g` is a built Keras layer, each pass runs as a traced function of `g`'s weights that
    is shared by every block whose `g` has the same structure (`tfp_resflow.block_functions`):
    a deep flow traces and compiles each kind of block once.

    Args:
        residual_fn: `g`, mapping `[batch, *event]` to the same shape with `Lip(g) < 1`.
        event_ndims: 1 for vector events `[D]`, 3 for image events `[H, W, C]`.
        log_det: training estimator: "unbiased" (default), "exact", "truncated", or a callable
            with the `tfp_resflow.logdet` signature.
        log_det_options: options of the training estimator, e.g.
            `{"distribution": "poisson", "rate": 2.0, "num_exact_terms": 2}`.
        eval_log_det: evaluation estimator; "auto" (default) is exact for events of at most
            `EVAL_EXACT_MAX_EVENT_SIZE` dimensions, else the roulette with 20 exact terms.
        eval_log_det_options: options of an explicit evaluation estimator.
        atol: absolute tolerance of the fixed-point inverse; by default set from the input's
            dtype (`DEFAULT_TOLERANCE`: 1e-6 for float32, 1e-12 for float64). The solution's
            error is at most `Lip(g) / (1 - Lip(g))` times the last step.
        rtol: relative tolerance of the fixed-point inverse; default as `atol`.
        max_iterations: iteration cap of the fixed-point inverse (and of its gradient).
        on_nonconvergence: "raise" (default) or "nan".
        validate_args: check inputs for NaN/inf.
        name: name scope.
    """

    def __init__(
        self,
        residual_fn: Callable[[tf.Tensor], tf.Tensor],
        *,
        event_ndims: int = 1,
        log_det: str | logdet.LogDetFn = "unbiased",
        log_det_options: Mapping[str, Any] | None = None,
        eval_log_det: str | logdet.LogDetFn = "auto",
        eval_log_det_options: Mapping[str, Any] | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        max_iterations: int = 1000,
        on_nonconvergence: str = "raise",
        validate_args: bool = False,
        name: str = "residual_block",
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            if not callable(residual_fn):
                raise ValueError(f"residual_fn must be callable; got {residual_fn!r}.")
            if event_ndims not in (1, 3):
                raise ValueError(f"event_ndims must be 1 or 3; got {event_ndims!r}.")
            if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
                raise ValueError(f"max_iterations must be an integer >= 1; got {max_iterations!r}.")
            if max_iterations < 1:
                raise ValueError(f"max_iterations must be an integer >= 1; got {max_iterations!r}.")
            if on_nonconvergence not in ("raise", "nan"):
                raise ValueError(
                    f"on_nonconvergence must be 'raise' or 'nan'; got {on_nonconvergence!r}."
                )
            logdet.make_log_det_fn(log_det, log_det_options)  # validate now
            if eval_log_det != "auto":
                logdet.make_log_det_fn(eval_log_det, eval_log_det_options)
            self._residual_fn = residual_fn
            self._event_ndims = event_ndims
            self._settings = BlockSettings(
                log_det=log_det,
                log_det_options=_options(log_det_options),
                eval_log_det=eval_log_det,
                eval_log_det_options=_options(eval_log_det_options),
                atol=None if atol is None else _check_positive("atol", atol),
                rtol=None if rtol is None else _check_positive("rtol", rtol),
                max_iterations=max_iterations,
                on_nonconvergence=on_nonconvergence,
            )
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
    def residual_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """`g`, the residual branch."""
        return self._residual_fn

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        return [self._residual_fn] if isinstance(self._residual_fn, keras.layers.Layer) else []

    def log_det_fn(self, *, training: bool, event_size: int) -> logdet.LogDetFn:
        """The estimator used in the given mode for events of `event_size` dimensions."""
        return self._settings.estimator(training=training, event_size=event_size)

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
        could_trace = self._settings.traceable and isinstance(self._residual_fn, keras.layers.Layer)
        if self._functions is None or (could_trace and not self._functions.traced):
            self._functions = block_functions(self._residual_fn, self._settings)
            self._track_keras_variables()
        return self._functions

    def _check_input(self, t: tf.Tensor, name: str) -> tf.Tensor:
        if t.shape.rank is not None and t.shape.rank < self._event_ndims:
            raise ValueError(
                f"{self.name}: {name} must have at least {self._event_ndims} dimensions "
                f"(the event); got shape {t.shape}."
            )
        return self._check_finite(t, name)

    # -- TFP hooks ---------------------------------------------------------------------------------

    def _inverse_and_log_det(self, y: tf.Tensor, seed: Any = None) -> tuple[tf.Tensor, tf.Tensor]:
        y = self._check_input(y, "y")
        flat, batch_shape = self._flatten_batch(y)
        x, log_det = self._passes().joint(self._residual_fn, flat, seed, training=is_training())
        self._track_keras_variables()  # g may have been built by this call
        self._record_inverse(flat, x)
        return tf.reshape(x, tf.shape(y)), tf.reshape(log_det, batch_shape)

    def _inverse(self, y: tf.Tensor, seed: Any = None) -> tf.Tensor:
        y = self._check_input(y, "y")
        flat, _ = self._flatten_batch(y)
        x = self._passes().value(self._residual_fn, flat)
        self._track_keras_variables()
        self._record_inverse(flat, x)
        return tf.reshape(x, tf.shape(y))

    def _inverse_log_det_jacobian(self, y: tf.Tensor, seed: Any = None) -> tf.Tensor:
        return self._inverse_and_log_det(y, seed=seed)[1]

    def _forward(self, z: tf.Tensor, seed: Any = None) -> tf.Tensor:
        z = self._check_input(z, "z")
        flat, _ = self._flatten_batch(z)
        passes = self._passes()
        x, converged = passes.solve(self._residual_fn, flat, self._warm_start_for(flat))
        x = self._report_nonconvergence(x, converged > 0.5, flat)
        return tf.reshape(x, tf.shape(z))

    # -- warm starts: TFP asks for forward(inverse(y)) in every log_prob ------------------------

    def _record_inverse(self, y: tf.Tensor, x: tf.Tensor) -> None:
        """Remembers this thread's latest eager inverse pair (graphs have the value cache)."""
        if tf.executing_eagerly():
            self._recent.pair = (y, x)

    def _warm_start_for(self, z: tf.Tensor) -> tf.Tensor | None:
        """The recorded `y` of the latest eager inverse, to start the fixed-point iteration.

        Any start converges (the map is a contraction); when `z` is that inverse's output, as in
        TFP's density correction `fldj(inverse(y))`, the iteration stops after one step. It is
        a starting point, not a cached answer, so it cannot be stale.
        """
        pair = getattr(self._recent, "pair", None)
        if not tf.executing_eagerly() or pair is None:
            return None
        y, _ = pair
        if y.dtype != z.dtype or y.shape != z.shape:
            return None
        return y

    def _report_nonconvergence(self, x: tf.Tensor, converged: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Raises (unless `on_nonconvergence="nan"`) and NaN-fills unconverged examples.

        The residual (one more evaluation of g) is computed only when something failed.
        """
        settings = self._settings
        if settings.on_nonconvergence == "raise":
            all_converged = tf.reduce_all(converged)
            residual = tf.cond(
                all_converged,
                lambda: tf.zeros([], x.dtype),
                lambda: tf.reduce_max(
                    tf.abs(self._passes().value(self._residual_fn, tf.stop_gradient(x)) - z)
                ),
            )
            tolerances = solver.tolerances(x.dtype, settings.atol, settings.rtol)
            check = tf.debugging.Assert(
                all_converged,
                [
                    f"{self.name}: the fixed-point inverse did not converge within "
                    f"{settings.max_iterations} iterations (tolerances {tolerances}); "
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
