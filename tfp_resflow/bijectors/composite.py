"""Stacks of bijectors walked in one pass.

`StackedBijector` is the base of `ResidualFlowBijector` and `MultiscaleResidualFlow`: a list of
steps, in data -> latent order,

    Step(bijector, event_ndims)   apply `bijector.inverse` to events of rank `event_ndims`
    FactorOut()                   the second half of the channels leaves as a latent part
    Features()                    the activation here is a feature for a classifier

walked once for `inverse`, `inverse_log_det_jacobian` and `inverse_and_log_det` (the k-th
residual block's seed is `fold_in(seed, k)`), and backwards for `forward`. The latent is the
final tensor, or, with factor-outs, the concatenation of the flattened parts and the flattened
final tensor.

A stack with a `context_size` is conditional: its methods take `conditional_input=c`
(`[..., K]`, broadcast to the batch shape), flattened once and given to every conditional step.

`inverse_log_det_and_features` also returns the features a classification head reads in the same
pass (`tfp_resflow.models.hybrid`): the activations at the `Features()` marks and the parts that
leave at the factor-outs (the authors' heads), or the latent for a stack without either.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.actnorm import ActNorm
from tfp_resflow.bijectors.density_pass import SharedDensityPass
from tfp_resflow.bijectors.fresh_bijector import FreshBijector
from tfp_resflow.bijectors.joint_pass import inverse_and_log_det  # re-exported: users find it here
from tfp_resflow.bijectors.residual_block import ResidualBlock
from tfp_resflow.core import stateless_random
from tfp_resflow.core.context import conditional_kwargs, flatten_context

tfb = tfp.bijectors

__all__ = ["FactorOut", "Features", "Step", "StackedBijector", "inverse_and_log_det"]


class Step(NamedTuple):
    """One bijector of a stack and the rank of the events it takes (data side)."""

    bijector: tfb.Bijector
    event_ndims: int


class FactorOut(NamedTuple):
    """Keeps the first half of the last axis; the second half leaves as a latent part."""


class Features(NamedTuple):
    """Marks an activation that a classification head reads (no effect on the flow)."""


class StackedBijector(SharedDensityPass, FreshBijector):
    """Base of bijectors that are a data -> latent list of steps (see the module docstring).

    Subclasses set `self._steps` (a list of `Step`, `FactorOut` and `Features`) and call
    `self._set_shapes(input_event_shape)` once the steps exist, and may override `_prepare`
    (called with every input, e.g. to build lazily) and `_check_events`.
    """

    _steps: list[Step | FactorOut | Features]
    _input_event_shape: tuple[int, ...] | None = None
    _context_size: int | None = None

    @property
    def context_size(self) -> int | None:
        """K for a conditional stack (`conditional_input` of shape `[..., K]`), else None."""
        return self._context_size

    # -- static shapes -------------------------------------------------------------------------

    def _set_shapes(self, input_event_shape: Sequence[int]) -> None:
        """Propagates the data event shape through the steps (factor-outs record their parts)."""
        shape = tuple(int(n) for n in input_event_shape)
        self._input_event_shape = shape
        self._part_shapes: list[tuple[int, ...]] = []
        self._feature_shapes: list[tuple[int, ...]] = []
        for step in self._steps:
            if isinstance(step, Features):
                self._feature_shapes.append(shape)
            elif isinstance(step, FactorOut):
                kept = shape[-1] // 2
                self._part_shapes.append((*shape[:-1], shape[-1] - kept))
                self._feature_shapes.append(self._part_shapes[-1])
                shape = (*shape[:-1], kept)
            else:
                shape = tuple(step.bijector.inverse_event_shape(shape).as_list())
        self._final_shape = shape

    @property
    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Event shapes of the features of `inverse_log_det_and_features` (once built)."""
        return list(self._feature_shapes) or [self._latent_event_shape]

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the latent's parts in order: the factored-out ones, then the final one."""
        return [*self._part_shapes, self._final_shape]

    # Event shapes once the steps exist (a lazily built stack keeps TFP's defaults until then).

    def _inverse_event_shape(self, output_shape: tf.TensorShape) -> tf.TensorShape:
        if self._input_event_shape is None:
            return tf.TensorShape(output_shape)
        return tf.TensorShape(self._latent_event_shape)

    def _forward_event_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        if self._input_event_shape is None:
            return tf.TensorShape(input_shape)
        return tf.TensorShape(self._input_event_shape)

    def _inverse_event_shape_tensor(self, output_shape: tf.Tensor) -> tf.Tensor:
        if self._input_event_shape is None:
            return output_shape
        return tf.constant(self._latent_event_shape, tf.int32)

    def _forward_event_shape_tensor(self, input_shape: tf.Tensor) -> tf.Tensor:
        if self._input_event_shape is None:
            return input_shape
        return tf.constant(self._input_event_shape, tf.int32)

    @property
    def _latent_event_shape(self) -> tuple[int, ...]:
        if not self._part_shapes:
            return self._final_shape
        return (sum(math.prod(s) for s in self.latent_shapes),)

    # -- what subclasses may override ------------------------------------------------------------

    def _prepare(self, t: tf.Tensor, what: str) -> tf.Tensor:
        """Checks (and, for lazily built stacks, builds from) an input; `what` names it."""
        return self._check_values(t, what)

    # -- parts -----------------------------------------------------------------------------------

    @property
    def blocks(self) -> list[ResidualBlock]:
        """The residual blocks, in data -> latent order."""
        return [s.bijector for s in self._bijector_steps() if isinstance(s.bijector, ResidualBlock)]

    @property
    def actnorms(self) -> list[ActNorm]:
        """The ActNorm bijectors, in data -> latent order."""
        return [s.bijector for s in self._bijector_steps() if isinstance(s.bijector, ActNorm)]

    @property
    def keras_layers(self) -> list[keras.layers.Layer]:
        return [
            layer
            for s in self._bijector_steps()
            for layer in getattr(s.bijector, "keras_layers", [])
        ]

    def _bijector_steps(self) -> list[Step]:
        return [s for s in getattr(self, "_steps", []) if isinstance(s, Step)]

    # -- the walk --------------------------------------------------------------------------------

    def inverse_log_det_and_features(
        self, y: tf.Tensor, *, seed: Any = None, conditional_input: Any = None
    ) -> tuple[tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        """`(inverse(y), inverse_log_det_jacobian(y), features)` in one pass.

        Shapes: `y` `[..., *event]`; the latent and log-det as `inverse_and_log_det`; each
        feature has one batch axis (the flattened batch shape) followed by its own event shape:
        the activations at the `Features()` marks and the parts leaving at the factor-outs, in
        data -> latent order, or `[latent]` for a stack without either.
        """
        features: list[tf.Tensor] = []
        with self._name_and_control_scope("inverse_log_det_and_features"):
            y = tf.convert_to_tensor(y, dtype_hint=self.dtype, name="y")
            z, log_det = self._walk(
                y, log_det=True, seed=seed, features=features, context=conditional_input
            )
        if not features:
            features.append(tf.reshape(z, [-1, *self._latent_event_shape]))
        return z, log_det, features

    def _walk(
        self,
        y: tf.Tensor,
        *,
        log_det: bool,
        seed: Any,
        features: list | None = None,
        context: Any = None,
    ) -> tuple[tf.Tensor, Any]:
        """Data -> latent through every step; the log-det too when `log_det`.

        Each step's log-det is taken in the same pass as its value (`inverse_and_log_det`), so
        residual blocks evaluate `g` once and an ActNorm initialised by this batch contributes
        its initialised scale. `features`, if given, receives the activations marked by
        `Features()` and the parts leaving at factor-outs.
        """
        y = self._prepare(y, "y")
        event_shape = self._input_event_shape
        batch_shape = tf.shape(y)[: tf.rank(y) - len(event_shape)]
        t = tf.reshape(y, [-1, *event_shape])
        context = self._flat_context(context, batch_shape, t.dtype)
        total = tf.zeros(tf.shape(t)[:1], t.dtype) if log_det else None
        seed = None if seed is None else stateless_random.sanitize_seed(seed)
        parts: list[tf.Tensor] = []
        num_blocks = 0
        for step in self._steps:
            if not isinstance(step, Step):
                t = self._mark(step, t, parts, features)
                continue
            bijector, event_ndims = step
            kwargs = self._context_kwargs(bijector, context)
            if isinstance(bijector, ResidualBlock):
                if seed is not None:
                    kwargs["seed"] = stateless_random.fold_in(seed, num_blocks)
                num_blocks += 1
            if log_det:
                t, step_log_det = inverse_and_log_det(
                    bijector, t, event_ndims=event_ndims, **kwargs
                )
                total += step_log_det
            else:
                t = bijector.inverse(t, **kwargs)
        if parts:
            t = tf.concat([*parts, tf.reshape(t, [tf.shape(t)[0], -1])], axis=-1)
        z = tf.reshape(t, tf.concat([batch_shape, self._latent_event_shape], axis=0))
        if log_det:
            total = tf.reshape(total, batch_shape)
        return z, total

    def _flat_context(
        self, context: Any, batch_shape: tf.Tensor, dtype: tf.DType
    ) -> tf.Tensor | None:
        """The context as `[N, K]` for the flat batch of N examples (checked)."""
        size = self._context_size
        return flatten_context(context, batch_shape, size, owner=self.name, dtype=dtype)

    @staticmethod
    def _context_kwargs(bijector: tfb.Bijector, context: tf.Tensor | None) -> dict:
        return {} if context is None else conditional_kwargs(bijector, context)

    @staticmethod
    def _mark(
        step: FactorOut | Features, t: tf.Tensor, parts: list, features: list | None
    ) -> tf.Tensor:
        """A `FactorOut` (moves half of `t` to `parts`) or `Features` mark on the walk."""
        if isinstance(step, Features):
            if features is not None:
                features.append(t)
            return t
        kept = t.shape[-1] // 2
        if features is not None:
            features.append(t[..., kept:])
        parts.append(tf.reshape(t[..., kept:], [tf.shape(t)[0], -1]))
        return t[..., :kept]

    def _inverse(self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None) -> tf.Tensor:
        # Inside `TransformedDistribution.log_prob`: the joint walk, its log-det kept for the
        # density correction that follows (`tfp_resflow.bijectors.density_pass`).
        x = self._inverse_for_density(y, seed=seed, conditional_input=conditional_input)
        if x is not None:
            return x
        return self._walk(y, log_det=False, seed=None, context=conditional_input)[0]

    def _inverse_log_det_jacobian(
        self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None
    ) -> tf.Tensor:
        return self._walk(y, log_det=True, seed=seed, context=conditional_input)[1]

    def _inverse_and_log_det(
        self, y: tf.Tensor, seed: Any = None, conditional_input: Any = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        return self._walk(y, log_det=True, seed=seed, context=conditional_input)

    def _forward(self, z: tf.Tensor, seed: Any = None, conditional_input: Any = None) -> tf.Tensor:
        """Latent -> data: every step's `forward`, last step first, re-attaching the parts."""
        y = self._recorded_forward(z, seed=seed, conditional_input=conditional_input)
        if y is not None:  # z is the output of a joint walk of this density computation
            return y
        del seed  # the solves are deterministic
        z = self._prepare(z, "z")
        latent_shape = self._latent_event_shape
        batch_shape = tf.shape(z)[: tf.rank(z) - len(latent_shape)]
        t = tf.reshape(z, [-1, *latent_shape])
        context = self._flat_context(conditional_input, batch_shape, t.dtype)
        parts = []
        if self._part_shapes:
            sizes = [math.prod(s) for s in self.latent_shapes]
            *parts, t = tf.split(t, sizes, axis=-1)
            t = tf.reshape(t, [-1, *self._final_shape])
        for step in reversed(self._steps):
            if isinstance(step, Features):
                continue
            if isinstance(step, FactorOut):
                shape = self._part_shapes[len(parts) - 1]
                t = tf.concat([t, tf.reshape(parts.pop(), [-1, *shape])], axis=-1)
            else:
                t = step.bijector.forward(t, **self._context_kwargs(step.bijector, context))
        return tf.reshape(t, tf.concat([batch_shape, self._input_event_shape], axis=0))
