"""Bits per dimension of a density on dequantised data.

For data with `k` levels per dimension, uniformly dequantised and scaled to [0, 1)
(`x = (n + u) / k`, `n` in {0, ..., k - 1}, `u ~ U(0, 1)`), the density of the integer data
`n` is bounded below by the density of `x` times the volume `k**-D` of its bin, so

    bits/dim = (-log p(x) + D * log(k)) / (D * ln 2)

is an upper bound on the model's discrete negative log-likelihood in bits per dimension
(Theis et al., 2016), the number reported by Chen et al. (2019). Every Jacobian between the
scaled data `x` and the latent (logit transform, ActNorm, residual blocks) must be inside
`log p(x)`; the data pipeline only dequantises and scales.

References:
    Theis, van den Oord, Bethge (2016). A note on the evaluation of generative models. ICLR.
    https://arxiv.org/abs/1511.01844
"""

import math

import tensorflow as tf

from tfp_resflow.core import validation

__all__ = ["bits_per_dim"]


def bits_per_dim(log_prob: tf.Tensor, num_dims: int, num_levels: int | None = None) -> tf.Tensor:
    """Converts `log p(x)` (nats, any shape) to bits per dimension.

    Args:
        log_prob: log-density of the scaled data in nats, e.g. shape `[batch]`.
        num_dims: D, the number of dimensions of one data point (e.g. `H * W * C`).
        num_levels: k, the number of discrete levels per dimension before dequantisation and
            scaling to [0, 1) (256 for 8-bit images); None for continuous data (no offset).

    Returns:
        `(-log_prob + D log k) / (D ln 2)`, same shape as `log_prob`.

    Raises:
        ValueError: if `num_dims` is not a positive integer or `num_levels` not one >= 2.
    """
    num_dims = validation.positive_integer("num_dims", num_dims)
    num_levels = validation.optional(validation.integer, "num_levels", num_levels, 2)
    offset = 0.0 if num_levels is None else num_dims * math.log(num_levels)
    log_prob = tf.convert_to_tensor(log_prob)
    return (-log_prob + tf.constant(offset, log_prob.dtype)) / (num_dims * math.log(2.0))
