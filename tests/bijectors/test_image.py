"""Tests of the image bijectors: Squeeze and LogitTransform."""

import numpy as np
import pytest
import tensorflow as tf
from checks import assert_round_trip, brute_force_inverse_log_det

from tfp_resflow.bijectors.image import LogitTransform, Squeeze


def images(shape, seed=0, dtype=np.float64):
    return tf.constant(np.random.default_rng(seed).uniform(size=shape), dtype)


# ------------------------------------------------------------------------------------------------
# Squeeze


@pytest.mark.parametrize(
    ("shape", "squeezed"),
    [
        ((2, 4, 6, 2), (2, 2, 3, 8)),
        ((3, 2, 2, 2, 1), (3, 2, 1, 1, 4)),
        ((1, 8, 2, 3), (1, 4, 1, 12)),
    ],
)
def test_squeeze_shapes_and_exact_round_trip(shape, squeezed):
    squeeze = Squeeze()
    x = images(shape)
    z = squeeze.inverse(tf.identity(x))
    assert z.shape == squeezed
    assert tuple(squeeze.inverse_event_shape(shape[-3:])) == squeezed[-3:]
    assert tuple(squeeze.forward_event_shape(squeezed[-3:])) == shape[-3:]
    np.testing.assert_array_equal(squeeze.inverse_event_shape_tensor(shape[-3:]), squeezed[-3:])
    np.testing.assert_array_equal(squeeze.forward_event_shape_tensor(squeezed[-3:]), shape[-3:])
    # A permutation of the entries: the inverse is exact, bit for bit.
    np.testing.assert_array_equal(squeeze.forward(tf.identity(z)), x)
    np.testing.assert_array_equal(np.sort(z.numpy(), axis=None), np.sort(x.numpy(), axis=None))


def test_squeeze_moves_each_2x2_patch_into_channels():
    # Pixel (i, j) of a 2x2 patch and channel c go to channel (2 i + j) * C + c (TF's order).
    x = np.arange(2 * 4 * 2, dtype=np.float64).reshape(1, 2, 4, 2)
    z = Squeeze().inverse(x).numpy()
    for i in range(2):
        for j in range(2):
            for c in range(2):
                np.testing.assert_array_equal(z[0, :, :, (2 * i + j) * 2 + c], x[0, i::2, j::2, c])


def test_squeeze_is_volume_preserving():
    squeeze = Squeeze()
    x = images((3, 4, 2, 1))
    np.testing.assert_array_equal(squeeze.inverse_log_det_jacobian(x, event_ndims=3), 0.0)
    np.testing.assert_array_equal(squeeze.forward_log_det_jacobian(x[:, :2, :1], event_ndims=3), 0)
    np.testing.assert_allclose(brute_force_inverse_log_det(squeeze, x, 3), 0.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (2, 4, 5, 1)])
def test_squeeze_rejects_odd_images_naming_the_shape(shape):
    with pytest.raises(ValueError, match=rf"divisible by 2; got event shape \[{shape[1]}, "):
        Squeeze().inverse(tf.zeros(shape))
    with pytest.raises(ValueError, match="divisible by 2"):
        Squeeze().inverse_event_shape(shape[1:])


def test_squeeze_forward_rejects_channels_not_divisible_by_4():
    with pytest.raises(ValueError, match=r"divisible by 4; got event shape \[2, 2, 6\]"):
        Squeeze().forward(tf.zeros((1, 2, 2, 6)))


# ------------------------------------------------------------------------------------------------
# LogitTransform


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05, 0.3])
def test_logit_log_det_matches_autodiff(alpha):
    logit = LogitTransform(alpha)
    x = images((2, 3, 3, 2), seed=1)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = logit.inverse(tf.identity(x))
    slope = tape.gradient(y, x)  # elementwise map: the Jacobian is diagonal
    expected = np.log(slope.numpy()).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(logit.inverse_log_det_jacobian(x, event_ndims=3), expected, 1e-12)
    # The brute-force determinant of the full 18 x 18 Jacobian agrees.
    np.testing.assert_allclose(brute_force_inverse_log_det(logit, x, 3), expected, rtol=1e-12)
    # TFP's convention: fldj(y) = -ildj(forward(y)).
    np.testing.assert_allclose(
        logit.forward_log_det_jacobian(tf.identity(y), event_ndims=3), -expected, rtol=1e-10
    )


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_round_trip_and_values(alpha):
    logit = LogitTransform(alpha)
    x = images((4, 2, 2, 1), seed=2)
    s = alpha + (1 - 2 * alpha) * x.numpy()
    np.testing.assert_allclose(logit.inverse(tf.identity(x)), np.log(s / (1 - s)), rtol=1e-12)
    assert_round_trip(logit, x, atol=1e-12)


def test_logit_is_finite_at_the_ends_of_the_data_range():
    # float32 data of 8-bit images, x = (n + u) / 256 with u in [0, 1): the ends are 0 and
    # 1 - 2**-24 (the largest float32 below 1).
    x = tf.constant([0.0, 1.0 - 2.0**-24], tf.float32)
    for alpha in (1e-6, 0.05):
        logit = LogitTransform(alpha)
        assert np.all(np.isfinite(logit.inverse(x)))
        assert np.all(np.isfinite(logit.inverse_log_det_jacobian(x, event_ndims=1)))


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 0.7, "0.05", True, None])
def test_logit_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 0.5\); got"):
        LogitTransform(alpha)


def test_logit_validate_args_rejects_data_outside_the_unit_interval():
    logit = LogitTransform(0.05, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"data must lie in \[0, 1\]"):
        logit.inverse(tf.constant([0.5, 1.5]))
