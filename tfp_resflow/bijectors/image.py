"""Bijectors for image events `[..., H, W, C]`: `Squeeze` and `LogitTransform`.

Direction, as for every bijector of this package: TFP's `inverse` is data -> latent (the cheap
direction used by `log_prob`), `forward` is latent -> data (used by `sample`).

    Squeeze.inverse:         [H, W, C] -> [H/2, W/2, 4C]   2x2 space-to-depth, log-det 0
    LogitTransform.inverse:  x -> logit(alpha + (1 - 2 alpha) x)   elementwise

References:
    Dinh, Sohl-Dickstein, Bengio (2017). Density estimation using Real NVP. ICLR (squeeze,
    logit pre-processing). https://arxiv.org/abs/1605.08803
    Chen et al. (2019). Residual Flows for Invertible Generative Modeling, Sec. 6 and App. E.
    https://arxiv.org/abs/1906.02735
"""

import math
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfp_resflow.bijectors.fresh_bijector import FreshBijector
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.core import validation

__all__ = ["LogitTransform", "Squeeze", "scale_shapes", "squeezed_shape"]


def squeezed_shape(shape: tf.TensorShape | tuple, *, factor: int = 2) -> tf.TensorShape:
    """The event shape `[H / f, W / f, f * f * C]` after a space-to-depth of block `f`.

    Raises:
        ValueError: if the shape is not `[H, W, C]` or H or W does not divide by `factor`.
    """
    shape = tf.TensorShape(shape)
    if shape.rank is not None and shape.rank != 3:
        raise ValueError(f"Squeeze needs image events [H, W, C]; got event shape {shape}.")
    if shape.rank is None:
        return tf.TensorShape([None] * 3)
    h, w, c = shape.as_list()
    if (h is not None and h % factor) or (w is not None and w % factor):
        raise ValueError(
            f"Squeeze needs the height and width of image events to be divisible by {factor}; "
            f"got event shape {shape.as_list()}."
        )
    return tf.TensorShape(
        [
            None if h is None else h // factor,
            None if w is None else w // factor,
            None if c is None else c * factor * factor,
        ]
    )


class Squeeze(FreshBijector):
    """2x2 space-to-depth: a volume-preserving reshuffle of image events.

        inverse(x) = space_to_depth(x, 2)    [..., H, W, C] -> [..., H/2, W/2, 4C]
        forward(z) = depth_to_space(z, 2)    [..., h, w, c] -> [..., 2h, 2w, c/4]
        log|det| = 0

    The output channel of pixel `(i, j)` of a 2x2 patch and input channel `c` is
    `(2 i + j) * C + c` (TensorFlow's `space_to_depth`); Chen et al.'s PyTorch squeeze uses
    `4 c + 2 i + j`. The two differ by a fixed channel permutation, which matters only for which
    channels a factor-out keeps and for loading their checkpoints.

    Args:
        validate_args: check inputs for NaN/inf.
        name: name scope.
    """

    def __init__(self, *, validate_args: bool = False, name: str = "squeeze") -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            super().__init__(
                forward_min_event_ndims=3,
                inverse_min_event_ndims=3,
                is_constant_jacobian=True,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    def _apply(self, t: tf.Tensor, op: Any, out_event: tf.TensorShape) -> tf.Tensor:
        t = self._check_values(t, "input")
        shape = tf.shape(t)
        batch_shape = shape[:-3]
        flat = tf.reshape(t, tf.concat([[-1], shape[-3:]], axis=0))
        out = op(flat, 2)
        result = tf.reshape(out, tf.concat([batch_shape, tf.shape(out)[1:]], axis=0))
        if t.shape.rank is not None:
            result = tf.ensure_shape(result, t.shape[:-3].concatenate(out_event))
        return result

    def _inverse(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        event = squeezed_shape(y.shape[-3:] if y.shape.rank is not None else None)
        return self._apply(y, tf.nn.space_to_depth, event)

    def _forward(self, z: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        event = self._forward_event_shape(z.shape[-3:] if z.shape.rank is not None else None)
        return self._apply(z, tf.nn.depth_to_space, event)

    def _inverse_event_shape(self, output_shape: tf.TensorShape) -> tf.TensorShape:
        return squeezed_shape(output_shape)

    def _forward_event_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        shape = tf.TensorShape(input_shape)
        if shape.rank is None:
            return tf.TensorShape([None] * 3)
        if shape.rank != 3:
            raise ValueError(f"Squeeze needs image events [h, w, c]; got event shape {shape}.")
        h, w, c = shape.as_list()
        if c is not None and c % 4:
            raise ValueError(
                "Squeeze.forward (depth-to-space) needs a channel count divisible by 4; "
                f"got event shape {shape.as_list()}."
            )
        return tf.TensorShape(
            [
                None if h is None else 2 * h,
                None if w is None else 2 * w,
                None if c is None else c // 4,
            ]
        )

    def _inverse_event_shape_tensor(self, output_shape: tf.Tensor) -> tf.Tensor:
        h, w, c = tf.unstack(tf.convert_to_tensor(output_shape, tf.int32), num=3)
        return tf.stack([h // 2, w // 2, 4 * c])

    def _forward_event_shape_tensor(self, input_shape: tf.Tensor) -> tf.Tensor:
        h, w, c = tf.unstack(tf.convert_to_tensor(input_shape, tf.int32), num=3)
        return tf.stack([2 * h, 2 * w, c // 4])

    def _inverse_log_det_jacobian(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return tf.zeros([], y.dtype)  # a permutation of the entries

    def _forward_log_det_jacobian(self, z: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return tf.zeros([], z.dtype)


class LogitTransform(FreshBijector):
    """The logit pre-processing of images in [0, 1] (elementwise, so for any event shape).

        s = alpha + (1 - 2 alpha) x
        inverse(x) = log(s) - log(1 - s)                     data -> latent
        forward(y) = (sigmoid(y) - alpha) / (1 - 2 alpha)    latent -> data
        inverse_log_det_jacobian(x) = sum(log(1 - 2 alpha) - log(s) - log(1 - s))

    `alpha` keeps the logit finite at 0 and 1 (Chen et al.: 1e-6 for MNIST, 0.05 otherwise).
    Its log-det is part of `log p(x)`, so bits per dimension stay those of the data in [0, 1).

    Args:
        alpha: in [0, 0.5).
        validate_args: check that inputs of `inverse` lie in [0, 1].
        name: name scope.
    """

    def __init__(
        self, alpha: float = 0.05, *, validate_args: bool = False, name: str = "logit_transform"
    ) -> None:
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            self._alpha = validation.number("alpha", alpha, at_least=0, below=0.5)
            super().__init__(
                forward_min_event_ndims=0,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    @property
    def alpha(self) -> float:
        """The margin `alpha` in [0, 0.5)."""
        return self._alpha

    @classmethod
    def _is_increasing(cls) -> bool:
        return True

    def _scaled(self, x: tf.Tensor) -> tf.Tensor:
        if self.validate_args:
            message = f"{self.name}: data must lie in [0, 1]."
            checks = [
                tf.debugging.assert_greater_equal(x, tf.zeros([], x.dtype), message),
                tf.debugging.assert_less_equal(x, tf.ones([], x.dtype), message),
            ]
            with tf.control_dependencies(checks):
                x = tf.identity(x)
        return self._alpha + (1.0 - 2.0 * self._alpha) * x

    def _inverse(self, x: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        s = self._scaled(x)
        return tf.math.log(s) - tf.math.log1p(-s)

    def _inverse_log_det_jacobian(self, x: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        s = self._scaled(x)
        return math.log1p(-2.0 * self._alpha) - tf.math.log(s) - tf.math.log1p(-s)

    def _forward(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        return (tf.sigmoid(y) - self._alpha) / (1.0 - 2.0 * self._alpha)

    def _forward_log_det_jacobian(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        # log sigmoid(y) + log(1 - sigmoid(y)) = -softplus(-y) - softplus(y), stable for any y.
        return -tf.nn.softplus(-y) - tf.nn.softplus(y) - math.log1p(-2.0 * self._alpha)


def scale_shapes(input_shape: Sequence[int], config: ImageFlowConfig) -> list[tuple[int, ...]]:
    """The event shape `(h, w, c)` on which each scale's blocks act, in order.

    With factor-out, scale `i + 1`'s shape is also that of the latent part leaving after scale
    `i`. For example `(64, 64, 3)` with the `imagenet64` preset gives `(32, 32, 12)`,
    `(16, 16, 24)`, `(8, 8, 48)`.

    Raises:
        ValueError: for a shape that is not `(H, W, C)`, or whose height or width the squeezes
            do not divide; the message names the shape.
    """
    shape = validation.image_shape("input_shape", input_shape)
    num_squeezes = len(config.blocks_per_scale) - 1 + int(config.squeeze_first)
    divisor = 2**num_squeezes
    if shape[0] % divisor or shape[1] % divisor:
        raise ValueError(
            f"Images of shape {shape} cannot be squeezed {num_squeezes} times "
            f"({len(config.blocks_per_scale)} scales, squeeze_first={config.squeeze_first}): "
            f"height and width must be divisible by {divisor}."
        )
    h, w, c = shape
    if config.squeeze_first:
        h, w, c = h // 2, w // 2, 4 * c
    shapes = [(h, w, c)]
    for _ in config.blocks_per_scale[1:]:
        h, w, c = h // 2, w // 2, (2 if config.factor_out else 4) * c
        shapes.append((h, w, c))
    return shapes
