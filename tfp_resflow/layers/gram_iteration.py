"""Guaranteed upper bounds on spectral norms by the Gram iteration (dense maps, convolutions).

The power method (`tfp_resflow.layers.operator_norm`) approaches ||A||_2 from below; these bounds
approach it from above, deterministically.

Gram iteration (Delattre, Barthelemy, Araujo, Allauzen, ICML 2023). For a matrix G_0 = W,

    r_t = ||G_t||_F,   G_{t+1} = (G_t / r_t)^H (G_t / r_t),   t = 0, ..., T - 1,

sigma_1(G_{t+1}) = sigma_1(G_t)**2 / r_t**2, and sigma_1(G_T) <= ||G_T||_F, hence

    log sigma_1(W) <= sum_{t < T} 2**-t log r_t + 2**-T log ||G_T||_F.

The right side exceeds log sigma_1(W) by at most 2**-(T+1) log rank(W) (the Frobenius norm
of G_T counts every singular value raised to the power 2**T), so T = 10 leaves at most 0.4% for
rank 4096. The rescaling by r_t keeps every G_t at unit Frobenius norm (no overflow); the
first product takes the smaller side (W W^H or W^H W: the same nonzero spectrum).

Convolutions. A circular convolution on N_h x N_w images is block-diagonalised by the 2-D DFT:
its spectral norm is the largest sigma_1 of the C_in x C_out matrices K^(w) of the kernel's
zero-padded transform at the N_h N_w frequencies, each bounded by the Gram iteration (batched).
A zero-padded convolution on H x W images (TensorFlow's "same" or "valid", any stride) is a
circular one on N_h = H + k_h - 1, N_w = W + k_w - 1 between an isometric embedding (the image
placed in a zero frame wide enough that no tap wraps around onto it) and a coordinate
selection (the crop, and the stride's subsampling), both of norm at most 1:

    ||conv_zero-padded|| <= ||conv_circular on (H + k_h - 1) x (W + k_w - 1)||.

Delattre, Barthelemy, Allauzen (2024) give a tighter zero-padding bound; this one is simple,
and within a few percent of the exact norm on the sizes the tests measure.

Rounding. In float64, each Gram step commits relative errors of order n * 1e-16 in sigma_1,
and the formula divides step t's by 2**t; `ROUNDING_MARGIN` (1e-9, relative) covers them for
any n below 10**6 with a wide margin.

References:
    Delattre, Barthelemy, Araujo, Allauzen (2023), Efficient bound of Lipschitz constant for
    convolutional layers by Gram iteration, ICML. https://arxiv.org/abs/2305.16173
    Delattre, Barthelemy, Allauzen (2024), Spectral norm of convolutional layers with circular
    and zero paddings. https://arxiv.org/abs/2402.00240
"""

__all__ = [
    "DEFAULT_ITERATIONS",
    "EXPLICIT_OPERATOR_ENTRIES",
    "ROUNDING_MARGIN",
    "circular_conv_matrices",
    "conv_operator_matrices",
    "conv_spectral_bound",
    "gram_spectral_bound",
    "gram_spectral_bound_numpy",
]

import math

import numpy as np
import tensorflow as tf

DEFAULT_ITERATIONS = 10
ROUNDING_MARGIN = 1e-9
# Up to this many entries (32 MB in float64) a convolution's operator matrix is built and
# bounded directly: the exact norm up to the Gram iteration's own tolerance.
EXPLICIT_OPERATOR_ENTRIES = 2**22


def _frobenius(g: tf.Tensor) -> tf.Tensor:
    """`||G||_F` of each matrix, scaled by its largest entry.

    So that squares cannot over- or underflow (for entries near 1e200 or 1e-200).
    """
    a = tf.abs(g)
    m = tf.reduce_max(a, axis=(-2, -1))
    safe = tf.where(m > 0, m, tf.ones_like(m))
    return m * tf.sqrt(tf.reduce_sum(tf.square(a / safe[..., None, None]), axis=(-2, -1)))


def gram_spectral_bound(matrices: tf.Tensor, iterations: int = DEFAULT_ITERATIONS) -> tf.Tensor:
    """An upper bound on the largest singular value of each matrix (module docs).

    Args:
        matrices: `[..., m, n]` real or complex Tensor.
        iterations: T, the number of Gram steps (0: the Frobenius norm).

    Returns:
        `[...]` real Tensor, `>= sigma_1` of each matrix in exact arithmetic (0 for a zero
        matrix); not yet widened by `ROUNDING_MARGIN`.
    """
    g = tf.convert_to_tensor(matrices)
    if g.shape[-2] is not None and g.shape[-1] is not None and g.shape[-2] < g.shape[-1]:
        g = tf.linalg.adjoint(g)  # [..., n, m] with n > m: G^H G is the smaller m x m
    real = g.dtype.real_dtype
    log_bound = tf.zeros(tf.shape(g)[:-2], real)
    nonzero = tf.ones(tf.shape(g)[:-2], tf.bool)
    for t in range(iterations):
        r = _frobenius(g)
        nonzero = nonzero & (r > 0)
        safe = tf.where(r > 0, r, tf.ones_like(r))
        log_bound += math.ldexp(1.0, -t) * tf.math.log(safe)
        g = g / tf.cast(safe, g.dtype)[..., None, None]
        g = tf.matmul(g, g, adjoint_a=True)
    last = _frobenius(g)
    nonzero = nonzero & (last > 0)
    log_bound += math.ldexp(1.0, -iterations) * tf.math.log(
        tf.where(last > 0, last, tf.ones_like(last))
    )
    return tf.where(nonzero, tf.exp(log_bound), tf.zeros_like(log_bound))


def circular_conv_matrices(kernel: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """`K^(w)` of the circular convolution with `kernel` on `size` images, at every frequency.

    Args:
        kernel: `[k_h, k_w, C_in, C_out]` real Tensor (TensorFlow's conv2d layout).
        size: `(N_h, N_w)`, at least the kernel's size.

    Returns:
        `[N_h * N_w, C_in, C_out]` complex Tensor; the circular convolution's singular values
        are those of these matrices together.
    """
    k_h, k_w = kernel.shape[0], kernel.shape[1]
    n_h, n_w = size
    if n_h < k_h or n_w < k_w:
        raise ValueError(f"size {size} is smaller than the kernel {(k_h, k_w)}")
    complex_dtype = tf.complex128 if kernel.dtype == tf.float64 else tf.complex64
    taps = tf.transpose(kernel, [2, 3, 0, 1])  # [C_in, C_out, k_h, k_w]
    taps = tf.pad(taps, [[0, 0], [0, 0], [0, n_h - k_h], [0, n_w - k_w]])
    spectrum = tf.signal.fft2d(tf.cast(taps, complex_dtype))  # [C_in, C_out, N_h, N_w]
    spectrum = tf.transpose(spectrum, [2, 3, 0, 1])
    return tf.reshape(spectrum, [n_h * n_w, kernel.shape[2], kernel.shape[3]])


def conv_spectral_bound(
    kernel: tf.Tensor, image_size: tuple[int, int], iterations: int = DEFAULT_ITERATIONS
) -> tf.Tensor:
    """An upper bound on the spectral norm of a zero-padded convolution on `image_size` images.

    Any padding, any stride: the bound is the circular convolution's on the image enlarged by
    the kernel (module docs).

    Args:
        kernel: `[k_h, k_w, C_in, C_out]` real Tensor.
        image_size: `(H, W)` of the input images.
        iterations: Gram steps per frequency.

    Returns:
        A scalar real Tensor (not yet widened by `ROUNDING_MARGIN`).
    """
    k_h, k_w = kernel.shape[0], kernel.shape[1]
    size = (image_size[0] + k_h - 1, image_size[1] + k_w - 1)
    bounds = gram_spectral_bound(circular_conv_matrices(kernel, size), iterations)
    return tf.reduce_max(bounds)


def conv_operator_matrices(
    kernel: tf.Tensor,
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    strides: tuple[int, int],
    padding: str,
) -> tf.Tensor:
    """Matrices whose largest singular value bounds a convolution's spectral norm from above.

    The convolution is `conv2d(x, kernel, strides, padding)` from images of `in_shape`
    `(H, W, C_in)` to `out_shape` `(H', W', C_out)`. Its explicit operator matrix (the
    responses to the H W C_in impulses), `[1, H W C_in, H' W' C_out]`, when that has at most
    `EXPLICIT_OPERATOR_ENTRIES` entries (the exact norm); else the circular convolution's
    frequency matrices on the image enlarged by the kernel, `[N_h N_w, C_in, C_out]` (a few
    percent above the exact norm on 7 x 7 images,
    0.1% on 28 x 28; module docs). Differentiable in `kernel`.
    """
    h, w, c_in = in_shape
    k_h, k_w = kernel.shape[:2]
    inputs = h * w * c_in
    if inputs * math.prod(out_shape) <= EXPLICIT_OPERATOR_ENTRIES:
        impulses = tf.reshape(tf.eye(inputs, dtype=kernel.dtype), [inputs, h, w, c_in])
        columns = tf.nn.conv2d(impulses, kernel, list(strides), padding.upper())
        return tf.reshape(columns, [1, inputs, -1])
    return circular_conv_matrices(kernel, (h + k_h - 1, w + k_w - 1))


def gram_spectral_bound_numpy(
    matrices: np.ndarray, iterations: int = DEFAULT_ITERATIONS
) -> np.ndarray:
    """`gram_spectral_bound` in NumPy (float64 or complex128), for certification.

    The same iteration, outside TensorFlow: eagerly, TensorFlow's per-op dispatch made the
    digits model's 30 layer bounds take 2.6 s (2026-12-07), NumPy's small products take
    milliseconds, and nothing needs tracing. `tests/layers/test_gram_iteration.py` checks that both
    agree.
    """
    g = np.asarray(matrices)
    if g.shape[-2] < g.shape[-1]:
        g = np.conj(np.swapaxes(g, -2, -1))
    log_bound = np.zeros(g.shape[:-2])
    nonzero = np.ones(g.shape[:-2], bool)

    def frobenius(a: np.ndarray) -> np.ndarray:  # scaled by the largest entry, as above
        m = np.abs(a).max(axis=(-2, -1))
        safe = np.where(m > 0, m, 1.0)
        return m * np.sqrt((np.abs(a / safe[..., None, None]) ** 2).sum(axis=(-2, -1)))

    for t in range(iterations):
        r = frobenius(g)
        nonzero &= r > 0
        safe = np.where(r > 0, r, 1.0)
        log_bound += math.ldexp(1.0, -t) * np.log(safe)
        g = g / safe[..., None, None]
        g = np.conj(np.swapaxes(g, -2, -1)) @ g
    last = frobenius(g)
    nonzero &= last > 0
    log_bound += math.ldexp(1.0, -iterations) * np.log(np.where(last > 0, last, 1.0))
    return np.where(nonzero, np.exp(log_bound), 0.0)
