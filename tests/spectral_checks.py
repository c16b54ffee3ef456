"""Builders of small spectral layers and their explicit matrices, for the layer and norm tests."""

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow.layers.lipschitz import SpectralConv2D, SpectralDense
from tfp_resflow.layers.norm_order import NormOrder

# Tight tolerance for "after convergence": far below the 1% the issue asks for.
CONVERGE = dict(atol=1e-7, rtol=1e-7, max_iterations=3000)


def dense(n_in, units, *, stddev=1.0, dtype="float64", **kwargs):
    init = keras.initializers.RandomNormal(stddev=stddev, seed=1)
    layer = SpectralDense(units, kernel_initializer=init, dtype=dtype, **kwargs)
    layer.build((None, n_in))
    return layer


def conv(in_shape, filters, kernel_size, *, stddev=1.0, dtype="float64", **kwargs):
    init = keras.initializers.RandomNormal(stddev=stddev, seed=1)
    layer = SpectralConv2D(filters, kernel_size, kernel_initializer=init, dtype=dtype, **kwargs)
    layer.build((None, *in_shape))
    return layer


def operator_matrix(fn, in_shape, dtype=tf.float64):
    """Explicit matrix A [n_out, n_in] of the affine map fn, from its response to impulses."""
    n = int(np.prod(in_shape))
    impulses = tf.reshape(tf.eye(n, dtype=dtype), [n, *in_shape])
    response = fn(impulses) - fn(tf.zeros_like(impulses[:1]))  # remove the bias
    return tf.reshape(response, [n, -1]).numpy().T


def learnable_dense(p, q, units=3, n_in=2, **kwargs):
    domain = NormOrder(p, dtype="float64")
    codomain = domain if q == "same" else NormOrder(q, dtype="float64")
    return dense(n_in, units, domain=domain, codomain=codomain, **kwargs), domain, codomain
