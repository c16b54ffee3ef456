"""`GroupedAdam`: Keras' Adam, updating all variables of one shape with one set of ops.

Why not `keras.optimizers.Adam` as it is: its TensorFlow backend builds each variable's update
from separate ops (about 40 for Adam, 16 for the parameter EMA, 4 for global-norm clipping),
and TensorFlow traces, optimises and instantiates every one of them before the first step.
Residual flows have many small variables (each LipSwish has its own slope), so the optimizer
dominated the first step: the `mnist` preset has 573 variables, and its first training step took
101 s with Keras' Adam (with EMA and clipping, inside `LossScaleOptimizer`) against 42 s with
plain SGD (batch 8, `benchmarks/train_step.py`-style measurement, cProfile: 27 s of tracing in
`apply_gradients`).

`GroupedAdam` is `keras.optimizers.Adam` (same arguments, the same moment and EMA variables, so
the same checkpoints, `finalize_variable_values` and schedules) whose update, clipping and EMA
stack the variables of each (shape, dtype) group, compute once, and unstack:

    g <- g * clip / max(||g||, clip)                      over all gradients (global_clipnorm)
    m <- m + (g - m)(1 - beta_1),  v <- v + (g^2 - v)(1 - beta_2)
    x <- x - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)
    average <- momentum * average + (1 - momentum) * x    (momentum 0 at the first step)

exactly Keras' formulas, in Keras' order. Options that Keras implements per variable (weight
decay, per-variable clipping, gradient accumulation, AMSGrad, periodic EMA overwrite) and any
`tf.distribute` strategy use Keras' own path, which updates each replica's copy.
"""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfp_resflow.core import validation

__all__ = ["GroupedAdam"]


def _groups(variables: Sequence[Any]) -> list[list[int]]:
    """Positions of `variables` grouped by (shape, dtype), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for position, variable in enumerate(variables):
        key = (tuple(variable.shape), str(variable.dtype))
        groups.setdefault(key, []).append(position)
    return list(groups.values())


@keras.saving.register_keras_serializable(package="tfp_resflow")
class GroupedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` with the update of equal-shaped variables done together.

    Args:
        skip_nonfinite: leave the weights, moments, EMA and step count untouched in a step
            whose gradients are not all finite (what `keras.optimizers.LossScaleOptimizer` does
            at a scale of 1, from one check on the stacked gradients instead of one per
            variable). Grouped path only: under a `tf.distribute` strategy wrap the optimizer
            in a `LossScaleOptimizer` instead (`training.make_optimizer` does).
        **kwargs: the arguments of `keras.optimizers.Adam`.

    See the module docstring for what is grouped and when Keras' per-variable path runs.
    """

    def __init__(self, *args: Any, skip_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_nonfinite = validation.boolean("skip_nonfinite", skip_nonfinite)

    def get_config(self) -> dict:
        return {**super().get_config(), "skip_nonfinite": self.skip_nonfinite}

    def _grouped(self) -> bool:
        """Whether the grouped path applies (else Keras' own per-variable path runs)."""
        return not (
            tf.distribute.has_strategy()
            or self.gradient_accumulation_steps
            or self.weight_decay
            or self.clipnorm
            or self.clipvalue
            or self.amsgrad
            or self.ema_overwrite_frequency
        )

    def _backend_apply_gradients(self, grads: list, trainable_variables: list) -> None:
        if not self._grouped():
            if self.skip_nonfinite:
                raise ValueError(
                    "GroupedAdam(skip_nonfinite=True) works on one replica without per-variable "
                    "options; wrap the optimizer in keras.optimizers.LossScaleOptimizer instead."
                )
            super()._backend_apply_gradients(grads, trainable_variables)
            return
        groups = _groups(trainable_variables)
        stacked = [
            tf.stack([tf.cast(grads[i], trainable_variables[i].dtype) for i in group])
            for group in groups
        ]
        finite = None
        if self.skip_nonfinite:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in stacked])
        if self.global_clipnorm and self.global_clipnorm > 0:
            stacked = self._clip_stacked(stacked)
        learning_rate = self.learning_rate
        new_values = {}
        for group, gradient in zip(groups, stacked, strict=True):
            variables = [trainable_variables[i] for i in group]
            values = self._adam(gradient, variables, learning_rate, finite)
            for variable, value in zip(variables, values, strict=True):
                new_values[self._var_key(variable)] = value
        if self.use_ema:
            self._grouped_moving_average(new_values, finite)
        if finite is not None:
            # Keras' `apply` adds 1 to the step count after this; a skipped step must not count.
            self._iterations.assign_sub(1 - tf.cast(finite, self._iterations.dtype))

    def _clip_stacked(self, stacked: list[tf.Tensor]) -> list[tf.Tensor]:
        # Keras' `clip_by_global_norm`: the scale is NaN when the norm is not finite.
        squared = [tf.reduce_sum(tf.square(g)) for g in stacked]
        norm = tf.sqrt(tf.add_n([tf.cast(s, squared[0].dtype) for s in squared]))
        scale = self.global_clipnorm * tf.minimum(1.0 / norm, 1.0 / self.global_clipnorm)
        scale = scale + (norm - norm)
        return [g * tf.cast(scale, g.dtype) for g in stacked]

    def _adam(
        self, gradient: tf.Tensor, variables: list, learning_rate: Any, finite: tf.Tensor | None
    ) -> list[tf.Tensor]:
        """Keras' Adam step for one group; assigns and returns the variables' new values.

        With `finite` given and False, the old values are assigned back.
        """
        dtype = gradient.dtype
        lr = tf.cast(learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        indices = [self._get_variable_index(v) for v in variables]
        m = tf.stack([tf.convert_to_tensor(self._momentums[i]) for i in indices])
        v = tf.stack([tf.convert_to_tensor(self._velocities[i]) for i in indices])
        x = tf.stack([tf.convert_to_tensor(variable) for variable in variables])
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        new_m = m + (gradient - m) * (1 - self.beta_1)
        new_v = v + (tf.square(gradient) - v) * (1 - self.beta_2)
        new_x = x - new_m * alpha / (tf.sqrt(new_v) + self.epsilon)
        if finite is None:
            m, v, x = new_m, new_v, new_x
        else:
            m, v, x = (tf.where(finite, a, b) for a, b in ((new_m, m), (new_v, v), (new_x, x)))
        for i, m_i, v_i in zip(indices, tf.unstack(m), tf.unstack(v), strict=True):
            self.assign(self._momentums[i], m_i)
            self.assign(self._velocities[i], v_i)
        new_values = tf.unstack(x)
        for variable, value in zip(variables, new_values, strict=True):
            self.assign(variable, value)
        return new_values

    def _grouped_moving_average(self, new_values: dict, finite: tf.Tensor | None) -> None:
        """Keras' EMA of every trainable variable, from the values just assigned."""
        variables = self._trainable_variables
        for group in _groups(variables):
            members = [variables[i] for i in group]
            dtype = members[0].dtype
            current = tf.stack(
                [new_values.get(self._var_key(var)) for var in members]
                if all(self._var_key(var) in new_values for var in members)
                else [tf.convert_to_tensor(var) for var in members]
            )
            averages = [self._model_variables_moving_average[i] for i in group]
            average = tf.stack([tf.convert_to_tensor(a) for a in averages])
            not_first_step = tf.cast(tf.not_equal(self.iterations, 0), dtype)
            # keras.ops, as Keras writes it: its Python float goes through float32 first.
            momentum = keras.ops.multiply(not_first_step, self.ema_momentum)
            new_average = momentum * average + (1 - momentum) * current
            average = new_average if finite is None else tf.where(finite, new_average, average)
            for target, value in zip(averages, tf.unstack(average), strict=True):
                self.assign(target, value)
