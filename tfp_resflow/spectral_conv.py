"""`SpectralConv2D`: a convolution whose operator norm on its input images is at most c < 1.

The norm bounded is that of the convolution operator on images of the size the layer is
built for (its kernel, strides and zero padding included), not that of the reshaped kernel,
which can be 30% lower. The operator and its exact adjoint (`conv2d_transpose`) are an
`operator_norm.ConvOperator`; the soft rescaling and the power iterations are those of every
Lipschitz layer (`tfp_resflow.lipschitz`).
"""

__all__ = ["SpectralConv2D"]

import contextlib
import numbers

import keras
import numpy as np
import tensorflow as tf

from tfp_resflow import validation
from tfp_resflow.operator_norm import ConvOperator, MatrixOperator
from tfp_resflow.spectral_layer import SpectralLayer


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
