"""Tests of `spectral_conv.conv2d_few_outputs` and the layer's choice of it."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.layers import spectral_conv
from tfp_resflow.layers.spectral_conv import SpectralConv2D, conv2d_few_outputs

CASES = {
    "3x3-same-to-1": ((2, 6, 5, 16), (3, 3, 16, 1), "same"),
    "3x3-valid-to-2": ((2, 6, 5, 24), (3, 3, 24, 2), "valid"),
    "2x2-same-even-kernel": ((3, 5, 4, 8), (2, 2, 8, 2), "same"),
    "3x1-same": ((2, 4, 6, 9), (3, 1, 9, 3), "same"),
    "4x5-same-wide": ((1, 7, 9, 40), (4, 5, 40, 2), "same"),
}


@pytest.mark.parametrize(("x_shape", "kernel_shape", "padding"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_equals_conv2d_in_value_and_gradients(x_shape, kernel_shape, padding, jit_compile):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=x_shape))
    kernel = tf.constant(rng.normal(size=kernel_shape))
    upstream = tf.constant(rng.normal(size=tf.nn.conv2d(x, kernel, 1, padding.upper()).shape))

    def value_and_gradients(conv):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel)
        return [y, *tape.gradient(y, [x, kernel], output_gradients=upstream)]

    expected = value_and_gradients(lambda x, k: tf.nn.conv2d(x, k, 1, padding.upper()))
    ours = tf.function(
        lambda: value_and_gradients(lambda x, k: conv2d_few_outputs(x, k, padding)),
        jit_compile=jit_compile,
    )()
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("filters", "kernel_size", "strides", "few_outputs"),
    [(1, 3, 1, True), (2, 3, 1, True), (3, 3, 1, False), (1, 1, 1, False), (1, 3, 2, False)],
)
def test_the_layer_takes_the_matrix_product_only_where_it_is_the_same_convolution(
    monkeypatch, filters, kernel_size, strides, few_outputs
):
    calls = []
    original = spectral_conv.conv2d_few_outputs

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(spectral_conv, "conv2d_few_outputs", counted)
    monkeypatch.setattr(spectral_conv, "FEW_OUTPUTS_MIN_INPUT_SIZE", 6 * 6 * 18)
    layer = SpectralConv2D(filters, kernel_size, strides=strides, dtype="float64")
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 6, 6, 18)))  # 9 * 2 <= 18 < 9 * 3
    y = layer(x)
    assert bool(calls) == few_outputs
    calls.clear()
    monkeypatch.setattr(spectral_conv, "FEW_OUTPUTS_MIN_INPUT_SIZE", 6 * 6 * 18 + 1)
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
    assert not calls  # a smaller input than the threshold takes tf.nn.conv2d
    expected = tf.nn.conv2d(x, layer.effective_kernel(), strides, "SAME") + layer.bias
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
