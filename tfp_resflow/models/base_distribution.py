"""The default base distribution of a flow: a standard normal over its latent shape.

`FlowModel` builds it when no base is given, and treats a given base that is this
distribution as the default one, so that a model built as in the design card,
`TransformedDistribution(Sample(Normal(0, 1), latent_shape), flow)`, saves as a config.
"""

__all__ = ["is_standard_normal", "standard_normal"]

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


def standard_normal(latent_shape: tf.TensorShape, dtype: tf.DType | str) -> tfd.Distribution:
    """`Sample(Normal(0, 1), latent_shape)` with parameters of `dtype` (e.g. float64)."""
    zero = tf.constant(0.0, dtype)
    return tfd.Sample(tfd.Normal(zero, 1.0), sample_shape=latent_shape)


def is_standard_normal(base: tfd.Distribution, latent_shape: tf.TensorShape) -> bool:
    """Whether `base` is `Sample(Normal(0, 1), latent_shape)` with constant parameters."""
    if not isinstance(base, tfd.Sample) or not isinstance(base.distribution, tfd.Normal):
        return False
    normal = base.distribution
    try:
        constant = [
            tf.get_static_value(tf.convert_to_tensor(t)) for t in (normal.loc, normal.scale)
        ]
        shape = tf.get_static_value(tf.convert_to_tensor(base.sample_shape))
    except (TypeError, ValueError):
        return False
    if any(c is None for c in constant) or shape is None:
        return False
    loc, scale = constant
    return (
        np.shape(loc) == ()
        and np.shape(scale) == ()
        and float(loc) == 0.0
        and float(scale) == 1.0
        and tuple(np.atleast_1d(shape).tolist()) == tuple(latent_shape.as_list())
    )
