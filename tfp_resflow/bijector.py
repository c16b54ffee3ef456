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
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tfp_resflow import logdet

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

LOG_DET_NAMES = ("unbiased", "exact", "truncated")
# Evaluation: the exact log-det costs one VJP per event dimension, the authors' evaluation series
# about 20 + 2 VJPs, so exact is both cheaper and better up to about 20 dimensions.
EVAL_EXACT_MAX_EVENT_SIZE = 20
EVAL_NUM_EXACT_TERMS = 20
# Default fixed-point tolerances per dtype: a few hundred ulps, so that the iteration stops at
# the precision of the arithmetic instead of at an arbitrary 1e-5 (the authors' squared-step test
# effectively stops at |step| ~ 3e-3).
DEFAULT_TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-12}

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


class FreshChain(tfb.Chain):
    """`tfb.Chain` with this package's cache policy (`_GraphOnlyCache`), for our composites."""

    _cache = _GraphOnlyCache()


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

    def _check_finite(self, t: tf.Tensor, name: str) -> tf.Tensor:
        """With `validate_args`, `t` behind a run-time check that it has no NaN or inf."""
        if self.validate_args:
            t = tf.debugging.assert_all_finite(t, f"{self.name}: {name} has NaN or inf.")
        return t

    @classmethod
    def _parameter_properties(cls, dtype: tf.DType, num_classes: Any = None) -> dict:
        return {}  # Weights live in Keras layers and carry no batch shape.


# ------------------------------------------------------------------------------------------------
# Estimator selection.


def make_log_det_fn(
    log_det: str | logdet.LogDetFn, options: Mapping[str, Any] | None = None
) -> logdet.LogDetFn:
    """Resolves a log-det name and its options to an estimator with the common signature.

    Args:
        log_det: "unbiased" (`russian_roulette_log_det`), "exact" (`exact_log_det`),
            "truncated" (`power_series_log_det`), or a callable with the `logdet` signature.
        options: keyword options bound to the estimator (for example
            `{"distribution": "poisson", "num_exact_terms": 2}`).

    Returns:
        `(residual_fn, x, *, seed=None) -> (g(x), log_det)`.

    Raises:
        ValueError: for an unknown name, or options given with a callable.
    """
    options = dict(options or {})
    if callable(log_det):
        return functools.partial(log_det, **options) if options else log_det
    estimators = {
        "unbiased": logdet.russian_roulette_log_det,
        "exact": logdet.exact_log_det,
        "truncated": logdet.power_series_log_det,
    }
    if log_det not in estimators:
        raise ValueError(f"log_det must be one of {LOG_DET_NAMES} or a callable; got {log_det!r}.")
    if log_det == "exact" and options:
        raise ValueError(f"log_det='exact' takes no options; got {sorted(options)}.")
    return functools.partial(estimators[log_det], **options)


def _eval_log_det_fn(
    eval_log_det: str | logdet.LogDetFn,
    eval_options: Mapping[str, Any] | None,
    train_log_det: str | logdet.LogDetFn,
    train_options: Mapping[str, Any],
    event_size: int,
) -> logdet.LogDetFn:
    if eval_log_det != "auto":
        return make_log_det_fn(eval_log_det, eval_options)
    if event_size <= EVAL_EXACT_MAX_EVENT_SIZE:
        return logdet.exact_log_det
    # The authors' evaluation: unbiased, with 20 exact terms, whatever the training estimator,
    # so that evaluation log-likelihoods are comparable across training ablations.
    options = {"num_exact_terms": EVAL_NUM_EXACT_TERMS, "neumann_gradient": False}
    if train_log_det == "unbiased":
        for key in ("distribution", "p", "rate", "probe"):
            if key in train_options:
                options[key] = train_options[key]
    return functools.partial(logdet.russian_roulette_log_det, **options)


# ------------------------------------------------------------------------------------------------
# The block.


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}.")
    return float(value)


class ResidualBlock(FreshBijector):
    """Invertible residual block `x + g(x)` with `Lip(g) < 1`, as a TFP bijector.

        inverse(y) = y + g(y)                             (data -> latent)
        inverse_log_det_jacobian(y) = log|det(I + J_g(y))|
        forward(z) = x  such that  x + g(x) = z           (latent -> data)

    The forward map iterates `x <- z - g(x)` from `x = z - g(z)` until every element moves by
    at most `atol + rtol * |z|`, or `max_iterations` is reached; the iteration converges
    geometrically at rate `Lip(g)`. If it does not converge, the block raises an
    `InvalidArgumentError` giving the largest residual `|x + g(x) - z|` (with
    `on_nonconvergence="raise"`), and the unconverged examples are returned as NaN in any case
    (XLA drops assertions; a NaN sample cannot pass for a real one).

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
            self._residual_fn = residual_fn
            self._event_ndims = event_ndims
            self._log_det = log_det
            self._log_det_options = dict(log_det_options or {})
            self._train_log_det_fn = make_log_det_fn(log_det, self._log_det_options)
            if eval_log_det != "auto":
                make_log_det_fn(eval_log_det, eval_log_det_options)  # validate now
            self._eval_log_det = eval_log_det
            self._eval_log_det_options = dict(eval_log_det_options or {})
            self._atol = None if atol is None else _check_positive("atol", atol)
            self._rtol = None if rtol is None else _check_positive("rtol", rtol)
            self._max_iterations = max_iterations
            self._on_nonconvergence = on_nonconvergence
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
        if training:
            return self._train_log_det_fn
        return _eval_log_det_fn(
            self._eval_log_det,
            self._eval_log_det_options,
            self._log_det,
            self._log_det_options,
            event_size,
        )

    # -- shape plumbing: the estimators and g take [batch, *event] -------------------------------

    def _flatten_batch(self, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.shape(t)
        batch_shape = shape[: tf.rank(t) - self._event_ndims]
        event_shape = shape[tf.rank(t) - self._event_ndims :]
        flat = tf.reshape(t, tf.concat([[-1], event_shape], axis=0))
        if t.shape.rank is not None:  # keep static event dims for layers that need them
            flat = tf.ensure_shape(flat, [None, *t.shape[t.shape.rank - self._event_ndims :]])
        return flat, batch_shape

    def _g(self, t: tf.Tensor) -> tf.Tensor:
        out = self._residual_fn(t)
        self._track_keras_variables()
        return out

    def _check_input(self, t: tf.Tensor, name: str) -> tf.Tensor:
        if t.shape.rank is not None and t.shape.rank < self._event_ndims:
            raise ValueError(
                f"{self.name}: {name} must have at least {self._event_ndims} dimensions "
                f"(the event); got shape {t.shape}."
            )
        return self._check_finite(t, name)

    # -- TFP hooks ---------------------------------------------------------------------------------

    def _inverse(self, y: tf.Tensor, seed: Any = None) -> tf.Tensor:
        y = self._check_input(y, "y")
        flat, batch_shape = self._flatten_batch(y)
        x = flat + self._g(flat)
        self._record_inverse(flat, x)
        return tf.reshape(x, tf.shape(y))

    def _inverse_log_det_jacobian(self, y: tf.Tensor, seed: Any = None) -> tf.Tensor:
        y = self._check_input(y, "y")
        flat, batch_shape = self._flatten_batch(y)
        event_size = flat.shape[1:].num_elements()
        estimator = self.log_det_fn(training=is_training(), event_size=event_size or 2**31)
        _, log_det = estimator(self._g, flat, seed=seed)
        return tf.reshape(log_det, batch_shape)

    def _forward(self, z: tf.Tensor, seed: Any = None) -> tf.Tensor:
        z = self._check_input(z, "z")
        flat, _ = self._flatten_batch(z)
        return tf.reshape(self._solve(flat, self._warm_start_for(flat)), tf.shape(z))

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

    # -- the fixed-point inverse with its implicit gradient ----------------------------------------

    def _fixed_point(
        self, step: Callable[[tf.Tensor], tf.Tensor], start: tf.Tensor, scale: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Iterates `x <- step(x)` until every element moves by <= atol + rtol * |scale|.

        Returns the last iterate and a per-example convergence flag `[batch]`.
        """
        atol, rtol = self._tolerances(scale.dtype)
        tolerance = atol + rtol * tf.abs(scale)

        def per_example_done(new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
            ok = tf.abs(new - old) <= tolerance
            return tf.reduce_all(tf.reshape(ok, [tf.shape(ok)[0], -1]), axis=1)

        def body(i: tf.Tensor, x: tf.Tensor, done: tf.Tensor) -> tuple:
            new = step(x)
            return i + 1, new, per_example_done(new, x)

        _, x, done = tf.while_loop(
            lambda i, x, done: tf.logical_and(i < self._max_iterations, ~tf.reduce_all(done)),
            body,
            (tf.constant(0), start, tf.zeros([tf.shape(start)[0]], tf.bool)),
        )
        return x, done

    def _solve(self, z: tf.Tensor, start: tf.Tensor | None = None) -> tf.Tensor:
        g = self._g

        @tf.custom_gradient
        def solve(z_in: tf.Tensor) -> tuple[tf.Tensor, Callable[..., Any]]:
            # The authors start from z - g(z), one iteration from z.
            x0 = z_in - g(z_in) if start is None else tf.stop_gradient(start)
            x, converged = self._fixed_point(lambda x: z_in - g(x), x0, z_in)
            x = self._report_nonconvergence(
                x, converged, lambda: tf.reduce_max(tf.abs(x + g(x) - z_in)), "inverse"
            )

            def grad_fn(dx: tf.Tensor, variables: list | None = None) -> Any:
                # z = x + g(x)  =>  dL/dz = a with a (I + J) = dL/dx, i.e. a = dx - a J,
                # solved by the same contraction; dL/dtheta = -a dg/dtheta.
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(x)
                    gx = g(x)
                a, ok = self._fixed_point(
                    lambda a: dx - tape.gradient(gx, x, output_gradients=a), dx, dx
                )
                # No residual here: a tf.cond in a gradient breaks pfor (batch_jacobian).
                a = self._report_nonconvergence(a, ok, None, "inverse's gradient")
                if variables is None:
                    return a
                grads = tape.gradient(
                    gx,
                    variables,
                    output_gradients=-a,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                return a, grads

            return x, grad_fn

        return solve(z)

    def _tolerances(self, dtype: tf.DType) -> tuple[float, float]:
        default = DEFAULT_TOLERANCE.get(tf.as_dtype(dtype).name, 1e-6)
        atol = default if self._atol is None else self._atol
        rtol = default if self._rtol is None else self._rtol
        return atol, rtol

    def _report_nonconvergence(
        self,
        x: tf.Tensor,
        converged: tf.Tensor,
        residual_fn: Callable[[], tf.Tensor] | None,
        what: str,
    ) -> tf.Tensor:
        """Raises (unless `on_nonconvergence="nan"`) and NaN-fills unconverged examples.

        The residual (one more evaluation of g) is computed only when something failed.
        """
        if self._on_nonconvergence == "raise":
            all_converged = tf.reduce_all(converged)
            residual = tf.constant(float("nan"), x.dtype)
            if residual_fn is not None:
                residual = tf.cond(
                    all_converged,
                    lambda: tf.zeros([], x.dtype),
                    lambda: tf.cast(residual_fn(), x.dtype),
                )
            check = tf.debugging.Assert(
                all_converged,
                [
                    f"{self.name}: the fixed-point {what} did not converge within "
                    f"{self._max_iterations} iterations (tolerances {self._tolerances(x.dtype)}); "
                    "largest residual:",
                    residual,
                    "examples not converged:",
                    tf.reduce_sum(tf.cast(~converged, tf.int32)),
                ],
                summarize=1,
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        mask = tf.reshape(converged, tf.concat([[-1], tf.ones([tf.rank(x) - 1], tf.int32)], 0))
        return tf.where(mask, x, tf.constant(float("nan"), x.dtype))
