"""Tests of `tfp_resflow.models.bits.bits_per_dim`."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.models.bits import bits_per_dim


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_uniform_density_on_the_unit_cube_gives_log2_levels(num_levels):
    # The uniform density on [0, 1)^D has log p = 0: each of the k**D bins gets mass k**-D,
    # which is exactly log2(k) bits per dimension.
    bpd = bits_per_dim(tf.zeros([3], tf.float64), num_dims=784, num_levels=num_levels)
    np.testing.assert_allclose(bpd, np.log2(num_levels), rtol=1e-12)


def test_continuous_data_is_nats_per_dim_in_bits():
    log_prob = tf.constant([-10.0, 2.0])
    np.testing.assert_allclose(
        bits_per_dim(log_prob, num_dims=5), [10 / 5 / np.log(2), -2 / 5 / np.log(2)]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_dims=0), "num_dims must be a positive integer; got 0"),
        (dict(num_dims=2.5), "num_dims must be a positive integer; got 2.5"),
        (dict(num_dims=4, num_levels=1), "num_levels must be an integer >= 2; got 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bits_per_dim(0.0, **kwargs)
