"""`FreshBijector`: the base class of this package's bijectors, and its cache.

TFP caches bijector results by tensor identity. In eager mode that cache returns values from
before a variable update when the same input tensor is reused, and it freezes a stochastic log-det
per tensor. Here results are cached only while tracing a graph (where every trace has fresh
tensors and variables are read at run time), and log-dets are never cached, so every call is a
fresh estimate. The base class also adds the joint `inverse_and_log_det` and exposes the weights
of Keras layers to `tf.Module` tracking.
"""

import numbers
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tfp_resflow.core.graph_writes import variable_writes

tfb = tfp.bijectors

__all__ = ["FreshBijector", "keras_layers_of"]


class _GraphOnlyCache(cache_util.BijectorCache):
    """Caches forward/inverse values only for inputs of the graph being traced now.

    - Eager: no caching (TFP's cache would serve results computed before a variable update).
      TFP's `log_prob` path (which asks for `forward(inverse(y))` and its log-det) is answered
      from the joint pass instead (`density_pass`), and `ResidualBlock` warm-starts any other
      fixed-point solve from its latest inverse pair.
    - Graph: caching is safe (fresh symbolic tensors per trace, variables read at run time) and
      lets `sample` + `log_prob` in one `tf.function` skip the fixed-point solve. Entries are
      keyed by the graph's variable writes so far (`graph_writes.variable_writes`): after an
      optimizer step traced into the same function, the same tensor is transformed anew.
    - Inputs from another graph (Keras traces `call` in a scratch graph with the real input
      tensors) are not cached, so no scratch-graph tensor can leak into the real graph.
    - Entries are keyed by replica context too: replicas of a `tf.distribute` strategy traced
      into one graph may share an input tensor, and a value computed with one replica's copy of
      the variables would carry no gradient to another's.
    - Attributes (where TFP stores log-dets) are always fresh, so each call re-estimates.
    """

    _REPLICA_KEY = "_tfp_resflow_replica"
    _WRITES_KEY = "_tfp_resflow_variable_writes"

    def _lookup(self, input: Any, forward_name: str, inverse_name: str, **kwargs: Any) -> Any:  # noqa: A002
        graph = getattr(input, "graph", None)
        if tf.executing_eagerly() or graph is not tf.compat.v1.get_default_graph():
            return getattr(self.bijector, forward_name)(input, **kwargs)
        kwargs[self._REPLICA_KEY] = id(tf.distribute.get_replica_context())
        kwargs[self._WRITES_KEY] = variable_writes(graph)
        return super()._lookup(input, forward_name, inverse_name, **kwargs)

    def _invoke(self, input: Any, fn_name: str, kwargs: dict, attributes: dict) -> Any:  # noqa: A002
        private = (self._REPLICA_KEY, self._WRITES_KEY)
        kwargs = {k: v for k, v in kwargs.items() if k not in private}
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
        keeps one block's activations at a time (see `tfp_resflow.bijectors.block_functions`).

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

    def _check_values(self, t: tf.Tensor, name: str) -> tf.Tensor:
        """`t`, checked to be floating; with `validate_args`, also free of NaN and inf.

        Raises:
            ValueError: for an integer or other non-floating tensor (the layers' weights are
                floats, and TFP would fail later, on a constant, without naming the input).
        """
        if not t.dtype.is_floating:
            raise ValueError(
                f"{self.name}: {name} must be a floating-point tensor (float32 or float64); got "
                f"dtype {t.dtype.name}. Cast it first, e.g. tf.cast({name}, tf.float32)."
            )
        if self.validate_args:
            t = tf.debugging.assert_all_finite(t, f"{self.name}: {name} has NaN or inf.")
        return t

    @classmethod
    def _parameter_properties(cls, dtype: tf.DType, num_classes: Any = None) -> dict:
        return {}  # Weights live in Keras layers and carry no batch shape.


def keras_layers_of(bijector: tfb.Bijector) -> list[keras.layers.Layer]:
    """The Keras layers used by a bijector, searching through chains and inversions."""
    found: dict[int, keras.layers.Layer] = {}
    stack = [bijector]
    while stack:
        b = stack.pop()
        if isinstance(b, FreshBijector):
            for layer in b.keras_layers:
                found.setdefault(id(layer), layer)
        stack.extend(reversed(list(getattr(b, "bijectors", []) or [])))
        inner = getattr(b, "bijector", None)
        if isinstance(inner, tfb.Bijector):
            stack.append(inner)
    return list(found.values())
