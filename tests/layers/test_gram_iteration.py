"""Gram-iteration bounds against exact singular values of explicit matrices."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.layers.gram_iteration import (
    circular_conv_matrices,
    conv_operator_matrices,
    conv_spectral_bound,
    gram_spectral_bound,
    gram_spectral_bound_numpy,
)


def conv_operator(kernel: np.ndarray, size: int, strides: int, padding: str) -> np.ndarray:
    """The explicit matrix of TensorFlow's conv2d on [size, size, C_in] images."""
    c_in = kernel.shape[2]
    n = size * size * c_in
    impulses = tf.reshape(tf.eye(n, dtype=tf.float64), [n, size, size, c_in])
    columns = tf.nn.conv2d(impulses, kernel, strides, padding)
    return tf.reshape(columns, [n, -1]).numpy().T


@pytest.mark.parametrize("shape", [(5, 3), (3, 7), (64, 64), (1, 4), (40, 9)])
@pytest.mark.parametrize("iterations", [0, 3, 12])
def test_dense_bound_is_never_below_the_norm_and_within_the_rank_factor(shape, iterations):
    w = np.random.default_rng(sum(shape)).normal(size=shape)
    exact = np.linalg.norm(w, 2)
    bound = float(gram_spectral_bound(tf.constant(w), iterations))
    assert bound >= exact * (1 - 1e-12)
    assert bound <= exact * min(shape) ** (2.0 ** -(iterations + 1)) * (1 + 1e-12)


def test_complex_batched_matrices_and_zero_matrices():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 5)) + 1j * rng.normal(size=(4, 3, 5))
    w[2] = 0.0
    bounds = gram_spectral_bound(tf.constant(w)).numpy()
    exact = np.linalg.norm(w, 2, axis=(-2, -1))
    np.testing.assert_allclose(bounds, exact, rtol=1e-3)
    assert np.all(bounds >= exact * (1 - 1e-12))
    assert bounds[2] == 0.0


def test_a_badly_scaled_matrix_neither_overflows_nor_underflows():
    w = np.diag([1e200, 3e199, 1.0])
    assert float(gram_spectral_bound(tf.constant(w))) == pytest.approx(1e200, rel=1e-12)
    tiny = np.diag([1e-300, 3e-301, 1e-305])
    assert float(gram_spectral_bound(tf.constant(tiny))) == pytest.approx(1e-300, rel=1e-12)


def test_the_frequency_matrices_give_the_circular_convolutions_singular_values():
    kernel = np.random.default_rng(1).normal(size=(3, 3, 2, 3))
    size = 5
    # The circular convolution's matrix: convolve the periodically extended impulses.
    n = size * size * 2
    impulses = tf.reshape(tf.eye(n, dtype=tf.float64), [n, size, size, 2])
    wrapped = tf.concat([impulses[:, -1:], impulses, impulses[:, :1]], axis=1)
    wrapped = tf.concat([wrapped[:, :, -1:], wrapped, wrapped[:, :, :1]], axis=2)
    circular = tf.reshape(tf.nn.conv2d(wrapped, kernel, 1, "VALID"), [n, -1]).numpy().T
    expected = np.sort(np.linalg.svd(circular, compute_uv=False))
    matrices = circular_conv_matrices(tf.constant(kernel), (size, size)).numpy()
    found = np.linalg.svd(matrices, compute_uv=False)
    np.testing.assert_allclose(np.sort(found.ravel()), expected, atol=1e-10)


@pytest.mark.parametrize(
    ("kernel_size", "c_in", "c_out", "size", "strides", "padding"),
    [
        (3, 2, 3, 5, 1, "SAME"),
        (3, 2, 3, 6, 2, "SAME"),
        (3, 1, 1, 4, 1, "VALID"),
        (5, 2, 2, 6, 1, "SAME"),
        (2, 3, 2, 5, 1, "SAME"),
        (1, 3, 4, 4, 1, "SAME"),
        (3, 4, 8, 12, 1, "SAME"),
    ],
)
def test_zero_padded_convolution_bound_is_never_below_the_exact_norm(
    kernel_size, c_in, c_out, size, strides, padding
):
    kernel = np.random.default_rng(kernel_size * c_in + size).normal(
        size=(kernel_size, kernel_size, c_in, c_out)
    )
    exact = np.linalg.norm(conv_operator(kernel, size, strides, padding), 2)
    bound = float(conv_spectral_bound(tf.constant(kernel), (size, size)))
    assert bound >= exact * (1 - 1e-12)
    # The stated factors: within 1.6 on these tiny images (valid padding crops the most), 2 with
    # stride 2 (the subsampling drops outputs), 2% on 12 x 12.
    assert bound <= exact * (1.02 if size >= 12 else 1.6 if strides == 1 else 2.0)


def test_sizes_smaller_than_the_kernel_are_refused():
    with pytest.raises(ValueError, match="smaller than the kernel"):
        circular_conv_matrices(tf.zeros([3, 3, 1, 1], tf.float64), (2, 5))


def test_iterations_tighten_the_bound_monotonically():
    w = tf.constant(np.random.default_rng(3).normal(size=(30, 20)))
    bounds = [float(gram_spectral_bound(w, t)) for t in range(8)]
    assert all(b1 <= b0 * (1 + 1e-12) for b0, b1 in zip(bounds, bounds[1:], strict=False))
    assert math.isclose(bounds[-1], np.linalg.norm(w.numpy(), 2), rel_tol=1e-2)


@pytest.mark.parametrize("iterations", [0, 5, 12])
def test_the_numpy_iteration_is_the_tensorflow_one(iterations):
    rng = np.random.default_rng(iterations)
    real = rng.normal(size=(3, 7, 4))
    real[1] = 0.0
    complex_ = rng.normal(size=(5, 3, 6)) + 1j * rng.normal(size=(5, 3, 6))
    for matrices in (real, complex_, np.diag([1e200, 3e199])[None]):
        np.testing.assert_allclose(
            gram_spectral_bound_numpy(matrices, iterations),
            gram_spectral_bound(tf.constant(matrices), iterations).numpy(),
            rtol=1e-12,
        )


@pytest.mark.parametrize("explicit", [True, False])
def test_operator_matrices_bound_the_convolution(explicit, monkeypatch):
    from tfp_resflow.layers import gram_iteration

    if not explicit:
        monkeypatch.setattr(gram_iteration, "EXPLICIT_OPERATOR_ENTRIES", 0)
    kernel = np.random.default_rng(7).normal(size=(3, 3, 2, 3))
    matrices = conv_operator_matrices(tf.constant(kernel), (5, 5, 2), (5, 5, 3), (1, 1), "SAME")
    assert matrices.shape[0] == (1 if explicit else 49)
    exact = np.linalg.norm(conv_operator(kernel, 5, 1, "SAME"), 2)
    bound = gram_spectral_bound_numpy(matrices.numpy()).max()
    assert exact * (1 - 1e-12) <= bound <= exact * (1.003 if explicit else 1.6)
