"""`SpectralConv2D`: a convolution whose operator norm on its input images is at most c < 1.

The norm bounded is that of the convolution operator on images of the size the layer is
built for (its kernel, strides and zero padding included), not that of the reshaped kernel,
which can be 30% lower. The operator and its exact adjoint (`conv2d_transpose`) are an
`operator_norm.ConvOperator`; the soft rescaling and the power iterations are those of every
Lipschitz layer (`tfp_resflow.layers.lipschitz`).
"""

__all__ = ["SpectralConv2D", "conv2d_few_outputs"]

import contextlib
import numbers

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.layers.operator_norm import ConvOperator, MatrixOperator
from tfp_resflow.layers.spectral_layer import SpectralLayer


def _pair(name: str, value: object) -> tuple[int, int]:
    """A positive integer n as (n, n), or a pair of positive integers."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if isinstance(pair, tuple | list) and len(pair) == 2:
        with contextlib.suppress(ValueError):
            return validation.integers(name, pair)
    validation.fail(name, "a positive integer or a pair of them", value)


def _output_size(size: int, k: int, s: int, padding: str) -> int:
    return -(-size // s) if padding == "same" else (size - k) // s + 1


def _covered_taps(size: int, k: int, s: int, padding: str) -> np.ndarray:
    """Which of the k taps along one axis meet the image (not only padding) at least once."""
    out = _output_size(size, k, s, padding)
    before = max((out - 1) * s + k - size, 0) // 2 if padding == "same" else 0  # TF's rule
    position = np.arange(out)[:, None] * s - before + np.arange(k)[None, :]
    return ((position >= 0) & (position < size)).any(axis=0)


# Below this many input elements per example, the matrix product's extra ops (a pad, then
# kh * kw slices and sums) cost more than the convolution they replace: with it the `digits`
# models (8x8 images, 32-64 channels) took longer to their first samples (3.97 against 3.51 s,
# one run each) and trained no faster. The `mnist` preset's inputs are
# 25,088 (7x7x512) to 401,408 (28x28x512).
FEW_OUTPUTS_MIN_INPUT_SIZE = 16_384


def conv2d_few_outputs(x: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    """`tf.nn.conv2d(x, kernel, 1, padding)` as one matrix product, then shifted sums.

        u[b, p, q, (i, j), o] = sum_c x[b, p, q, c] kernel[i, j, c, o]     (one matmul)
        y[b, h, w, o] = sum_{i, j} u_padded[b, h + i, w + j, (i, j), o]

    The same products and sums as the convolution, for stride 1, where `kh * kw * C_out` is at
    most `C_in` (so `u` is no larger than `x`). The last convolution of an image block's `g`
    (512 -> 1 channels at 28x28 in the `mnist` preset) is such a reduction, which TensorFlow's
    and XLA's CPU convolutions run at 3-4 GFLOP/s: 0.13 s for a batch of 64, against 0.017 s
    this way (0.039 against 0.010 s for 512 -> 4 at 14x14; measured on 2 cores, 2026-12-07).

    Args:
        x: `[batch, H, W, C_in]`.
        kernel: `[kh, kw, C_in, C_out]`.
        padding: "same" (TensorFlow's rule: `k - 1` zeros per axis, the smaller half before)
            or "valid".

    Returns:
        `[batch, H', W', C_out]`, as `tf.nn.conv2d` with strides 1.
    """
    kh, kw, c_in, c_out = kernel.shape
    taps = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [c_in, kh * kw * c_out])
    u = tf.reshape(tf.matmul(tf.reshape(x, [-1, c_in]), taps), [-1, *x.shape[1:3], kh * kw * c_out])
    if padding == "same":
        pads = [[0, 0], [(kh - 1) // 2, kh - 1 - (kh - 1) // 2]]
        u = tf.pad(u, [*pads, [(kw - 1) // 2, kw - 1 - (kw - 1) // 2], [0, 0]])
    out_h, out_w = u.shape[1] - kh + 1, u.shape[2] - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = (i * kw + j) * c_out
            part = u[:, i : i + out_h, j : j + out_w, tap : tap + c_out]
            y = part if y is None else y + part
    return y


@keras.saving.register_keras_serializable(package="tfp_resflow")
class SpectralConv2D(SpectralLayer):
    """2-D convolution whose operator norm on [H, W, C_in] images is <= lipschitz_constant.

        y = conv2d(x, W_eff) + b,   W_eff = W / max(1, sigma / c),   W: [kh, kw, C_in, filters]

    sigma is the norm of the convolution operator itself (not of the reshaped kernel), at the
    spatial size fixed when the layer is built; the power method alternates `conv2d` and its
    adjoint `conv2d_transpose` with the same strides and zero padding. For 1x1 kernels the
    C_in x filters matrix is used instead, which is exact when p <= q (always for (2, 2));
    with learnable orders, which may cross, the operator is used.
    Only `channels_last` is supported.

    Args:
        filters: Output channels.
        kernel_size: Int or (kh, kw).
        strides: Int or (sh, sw).
        padding: "same" or "valid" (zero padding).
        **kwargs: The keyword arguments of `SpectralDense` (`lipschitz_constant`, `domain`,
            `codomain`, `power_iterations`, `atol`, `rtol`, `max_iterations`,
            `initial_power_iterations`, `use_bias`, `kernel_initializer`,
            `bias_initializer`, with the same defaults), then those of `keras.layers.Layer`.

    Input: float Tensor [batch, H, W, C_in] with the H, W, C_in it was built with.
    Output: [batch, H', W', filters].
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        *,
        strides: int | tuple[int, int] = 1,
        padding: str = "same",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = validation.positive_integer("filters", filters)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        padding = padding.lower() if isinstance(padding, str) else padding
        self.padding = validation.choice("padding", padding, ("same", "valid"))

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 4 or any(n is None for n in input_shape[1:]):
            raise ValueError(
                "SpectralConv2D needs a full input shape [batch, height, width, channels]: the "
                f"operator norm depends on the spatial size; got {input_shape}"
            )
        _, h, w, c = input_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        out_h, out_w = _output_size(h, kh, sh, self.padding), _output_size(w, kw, sw, self.padding)
        if min(out_h, out_w) <= 0:
            raise ValueError(f"kernel_size {self.kernel_size} is larger than the input {(h, w)}")
        self.kernel = self.add_weight(
            shape=(kh, kw, c, self.filters), initializer=self.kernel_initializer, name="kernel"
        )
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(self.filters,), initializer=self.bias_initializer, name="bias"
            )
        self.input_spec = keras.InputSpec(ndim=4, axes={1: h, 2: w, 3: c})
        # A 1x1 conv is block-diagonal over pixels: its norm is the matrix's when p <= q.
        # Learned orders may cross, so they always use the operator.
        static = not self.learnable_orders
        self._use_matrix = (kh, kw) == (1, 1) and (
            self._closed_form or (static and self.domain <= self.codomain)
        )
        if self._use_matrix:
            op = MatrixOperator(c, self.filters)
        else:
            mask = np.outer(
                _covered_taps(h, kh, sh, self.padding), _covered_taps(w, kw, sw, self.padding)
            )
            op = ConvOperator(
                [1, h, w, c],
                [1, out_h, out_w, self.filters],
                self.strides,
                self.padding,
                mask[:, :, None, None].astype(np.float32),
            )
        self._build_spectral(op)

    def _operator_kernel(self, kernel: tf.Tensor) -> tf.Tensor:
        return tf.reshape(kernel, tf.shape(kernel)[2:]) if self._use_matrix else kernel

    def call(self, x: tf.Tensor, *, training: bool | None = None) -> tf.Tensor:
        kernel = tf.cast(self.effective_kernel(), x.dtype)
        (kh, kw), c_in = self.kernel_size, kernel.shape[2]
        few_outputs = self.strides == (1, 1) and kh * kw > 1 and kh * kw * self.filters <= c_in
        if few_outputs and x.shape[1:].num_elements() >= FEW_OUTPUTS_MIN_INPUT_SIZE:
            y = conv2d_few_outputs(x, kernel, self.padding)
        else:
            y = tf.nn.conv2d(x, kernel, list(self.strides), self.padding.upper())
        return y + tf.cast(self.bias, y.dtype) if self.use_bias else y

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        b, h, w, _ = input_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        return (
            b,
            _output_size(h, kh, sh, self.padding),
            _output_size(w, kw, sw, self.padding),
            self.filters,
        )

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": list(self.strides),
            "padding": self.padding,
        }
