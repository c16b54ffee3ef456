"""Seeded random numbers that are identical in eager, `tf.function` and XLA.

Why not `tf.random.stateless_*`: in TF 2.21 on CPU their XLA kernels draw different numbers from
the TF kernels for the same seed (measured: `stateless_normal([3], [1, 2], alg="philox")` gives
`[0.544, 0.207, 0.074]` eagerly and `[0.929, -1.360, 0.208]` under `jit_compile=True`), so a seeded
log-det estimate would change when a user switches XLA on. Here every number is a pure integer
hash of `(seed, stream, element index)`, computed with uint32 ops (multiplications wrap modulo
2**32) that every backend evaluates exactly; only the final float transforms (log, cos) may
differ in the last ulp. (An earlier version emulated the same arithmetic with int64 ops and three
times as many graph nodes; the numbers are bit-identical.)

The hash is a counter-based generator: element `i` of stream `s` gets
`mix(mix(i + key0) ^ key1)`, with `(key0, key1)` derived from the seed and the stream, and
`mix` the "lowbias32" integer finaliser (C. Wellons, 2018), whose output passes common
avalanche tests. It is meant for Monte Carlo estimators, not for cryptography.
"""

from collections.abc import Sequence

import tensorflow as tf

from tfp_resflow.core import validation

__all__ = [
    "SeedLike",
    "fold_in",
    "normal",
    "rademacher",
    "sanitize_seed",
    "uniform",
]

SeedLike = int | Sequence[int] | tf.Tensor | None

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: decorrelates consecutive counters and streams.


def _u32(value: int) -> tf.Tensor:
    return tf.constant(value, tf.uint32)


def _mix32_int(x: int) -> int:
    """`_mix32` of a Python int in [0, 2**32), computed in Python (no graph ops)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """The lowbias32 finaliser on uint32 tensors (multiplications wrap modulo 2**32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def sanitize_seed(seed: SeedLike) -> tf.Tensor:
    """Maps a user seed to an int64 tensor of shape `[2]` holding two 32-bit words.

    Args:
        seed: `None` for a fresh seed on every call (drawn by a stateful TF op, so it changes at
            every execution of a `tf.function` too, unlike NumPy draws, which freeze at trace
            time); a Python int `s` (used as the pair `(0, s)`); or a pair of ints / an integer
            tensor of shape `[2]`, as for `tf.random.stateless_*`.

    Returns:
        An int64 `tf.Tensor` of shape `[2]` with entries in [0, 2**32).

    Raises:
        ValueError: if the seed is not of one of these forms.
    """
    if seed is None:
        seed = tf.random.uniform([2], minval=0, maxval=2**31 - 1, dtype=tf.int64)
    elif isinstance(seed, bool):
        validation.fail("seed", "None, an int or a pair of ints", seed)
    elif isinstance(seed, int):
        seed = tf.constant([0, seed], tf.int64)
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ValueError(f"seed must have an integer dtype; got {seed.dtype.name}.")
    if seed.shape.rank is not None and seed.shape != [2]:
        raise ValueError(f"seed must be an int or have shape [2]; got shape {seed.shape}.")
    return tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), _MASK32)


def fold_in(seed: tf.Tensor, stream: int) -> tf.Tensor:
    """Derives an independent seed for sub-stream `stream` from a sanitised seed.

    Args:
        seed: int64 tensor of shape `[2]` from `sanitize_seed`.
        stream: a Python int in [0, 2**32) naming the sub-stream.

    Returns:
        An int64 tensor of shape `[2]`, a sanitised seed.
    """
    words = tf.cast(seed, tf.uint32)
    key0 = _mix32(tf.bitwise.bitwise_xor(words[0], _u32(_mix32_int(stream & _MASK32))))
    key1 = _mix32(tf.bitwise.bitwise_xor(words[1], (key0 + _u32(1)) * _u32(_GOLDEN)))
    return tf.cast(tf.stack([key0, key1]), tf.int64)


def _random_words(shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Returns independent uniform 32-bit words (uint32) of the given shape."""
    size = tf.reduce_prod(tf.cast(shape, tf.int64))
    counter = tf.cast(tf.range(size, dtype=tf.int64), tf.uint32)
    words = tf.cast(seed, tf.uint32)
    mixed = _mix32(tf.bitwise.bitwise_xor(_mix32(counter * _u32(_GOLDEN) + words[0]), words[1]))
    return tf.reshape(mixed, shape)


def uniform(
    shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor, dtype: tf.DType
) -> tf.Tensor:
    """Uniform numbers in the open interval (0, 1).

    Float64 values carry 53 random bits (two words), float32 values 24 bits; both exclude 0 and 1
    exactly, so `log(u)` and `log(1 - u)` are always finite.

    Args:
        shape: output shape.
        seed: a sanitised seed (`sanitize_seed`).
        dtype: a floating dtype.

    Returns:
        A tensor of `shape` and `dtype`.
    """
    if dtype == tf.float64:
        high = tf.bitwise.right_shift(_random_words(shape, fold_in(seed, 0x68)), _u32(5))
        low = tf.bitwise.right_shift(_random_words(shape, fold_in(seed, 0x6C)), _u32(6))
        # 53 bits: 27 from one word, 26 from the other, then centre the bins: (k + 0.5) / 2**53.
        bits = tf.cast(high, tf.float64) * 2.0**26 + tf.cast(low, tf.float64)  # exact
        return (bits + 0.5) * 2.0**-53
    words = tf.bitwise.right_shift(_random_words(shape, seed), _u32(8))  # float32's 24 bits
    return tf.cast((tf.cast(words, tf.float64) + 0.5) * 2.0**-24, dtype)


def normal(
    shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor, dtype: tf.DType
) -> tf.Tensor:
    """Standard normal numbers by the Box-Muller transform of two independent uniforms.

    Args:
        shape: output shape.
        seed: a sanitised seed (`sanitize_seed`).
        dtype: a floating dtype.

    Returns:
        A tensor of `shape` and `dtype`.
    """
    u1 = uniform(shape, fold_in(seed, 1), tf.float64)
    u2 = uniform(shape, fold_in(seed, 2), tf.float64)
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(6.283185307179586 * u2)
    return tf.cast(z, dtype)


def rademacher(
    shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor, dtype: tf.DType
) -> tf.Tensor:
    """Independent signs, -1 or +1 with probability 1/2 each.

    Args:
        shape: output shape.
        seed: a sanitised seed (`sanitize_seed`).
        dtype: output dtype.

    Returns:
        A tensor of `shape` and `dtype`.
    """
    top_bit = tf.bitwise.right_shift(_random_words(shape, seed), _u32(31))
    return tf.cast(2.0 * tf.cast(top_bit, tf.float64) - 1.0, dtype)
