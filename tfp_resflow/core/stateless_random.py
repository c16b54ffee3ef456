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
    return tf.cast(_fold_in_words(tf.cast(seed, tf.uint32), (stream,))[0], tf.int64)


def _fold_in_words(words: tf.Tensor, streams: Sequence[int]) -> tf.Tensor:
    """`fold_in` of the seeds `words` (uint32, `[..., 2]`) for every stream at once.

    Returns uint32 keys of shape `[..., len(streams), 2]`: `(key0, key1)` with
    `key0 = mix(word0 ^ mix(stream))` and `key1 = mix(word1 ^ (key0 + 1) * golden)`. One set of
    ops serves every stream (and every seed of `words`), so a draw is one small graph: a normal
    draw took 496 nodes with one pipeline per stream, 175 this way (the hash was about a
    quarter of a residual block's training graph, traced and optimised once per model).
    """
    streams = tf.constant([_mix32_int(stream & _MASK32) for stream in streams], tf.uint32)
    key0 = _mix32(tf.bitwise.bitwise_xor(words[..., :1], streams))
    key1 = _mix32(tf.bitwise.bitwise_xor(words[..., 1:], (key0 + _u32(1)) * _u32(_GOLDEN)))
    return tf.stack([key0, key1], axis=-1)


def _random_words(shape: tf.TensorShape | Sequence[int] | tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
    """Independent uniform 32-bit words (uint32), one stream per key.

    Element `i` of the stream with key `(key0, key1)` is `mix(mix(i * golden + key0) ^ key1)`.

    Args:
        shape: the shape of each stream's words.
        keys: uint32, one seed's words `[2]` (returns `shape`), or `[k, 2]` with a static `k`
            for `k` streams at once (returns `[k, *shape]`).

    Returns:
        uint32 words of `shape`, or `[k, *shape]`.
    """
    size = tf.reduce_prod(tf.cast(shape, tf.int64))
    counter = tf.cast(tf.range(size, dtype=tf.int64), tf.uint32) * _u32(_GOLDEN)
    if keys.shape.rank == 1:  # one stream: no leading axis to add and slice off again
        mixed = _mix32(tf.bitwise.bitwise_xor(_mix32(counter + keys[0]), keys[1]))
        return tf.reshape(mixed, shape)
    mixed = _mix32(tf.bitwise.bitwise_xor(_mix32(counter + keys[:, :1]), keys[:, 1:]))
    return tf.reshape(mixed, tf.concat([[keys.shape[0]], tf.cast(shape, tf.int32)], 0))


# Per floating dtype: p, the bits of its significand (1 - 2**-p is the largest value below 1),
# and the exponent of its smallest positive normal number.
_OPEN_INTERVAL = {
    tf.float16: (11, -14),
    tf.bfloat16: (8, -126),
    tf.float32: (24, -126),
    tf.float64: (53, -1022),
}


def _in_open_interval(u: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """`u` (float64 in (0, 1)) cast to `dtype`, kept inside the open interval.

    Values the cast rounds to 0 or 1 move to the nearest values inside; the others are unchanged.
    """
    dtype = tf.as_dtype(dtype)  # also a name such as "float32", as `tf.cast` takes
    if dtype not in _OPEN_INTERVAL:
        raise ValueError(f"dtype must be a floating dtype; got {dtype!r}.")
    significand_bits, min_exponent = _OPEN_INTERVAL[dtype]
    low = tf.constant(2.0**min_exponent, dtype)
    high = tf.constant(1.0 - 2.0**-significand_bits, dtype)
    return tf.clip_by_value(tf.cast(u, dtype), low, high)


def _uniform53(high: tf.Tensor, low: tf.Tensor) -> tf.Tensor:
    """Float64 uniforms in (0, 1) from two words each.

    27 bits of `high` and 26 of `low` make an integer k < 2**53 (exact in float64), then the bins
    are centred: `(k + 0.5) / 2**53`, as float64 rounds it (to 1 for k = 2**53 - 1: see
    `_in_open_interval`).
    """
    high = tf.cast(tf.bitwise.right_shift(high, _u32(5)), tf.float64)
    low = tf.cast(tf.bitwise.right_shift(low, _u32(6)), tf.float64)
    return _in_open_interval((high * 2.0**26 + low + 0.5) * 2.0**-53, tf.float64)


def _uniform24(words: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Uniforms in (0, 1) of `dtype` from the top 24 bits k of each word.

    `(k + 0.5) / 2**24`, rounded to `dtype` (in float32 the top bin's centre, 1 - 2**-25, rounds
    to 1: see `_in_open_interval`).
    """
    k = tf.cast(tf.bitwise.right_shift(words, _u32(8)), tf.float64)
    return _in_open_interval((k + 0.5) * 2.0**-24, dtype)


# The streams of a float64 uniform's two words, and of a normal's two uniforms.
_HIGH, _LOW = 0x68, 0x6C
_FIRST_UNIFORM, _SECOND_UNIFORM = 1, 2


def uniform(
    shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor, dtype: tf.DType
) -> tf.Tensor:
    """Uniform numbers in the open interval (0, 1).

    Float64 values carry 53 random bits (two words, from the streams `fold_in(seed, 0x68)` and
    `fold_in(seed, 0x6C)`), other dtypes 24 bits rounded to the dtype; 0 and 1 are never
    returned (a value that rounds to either is moved to the nearest one inside), so `log(u)` and
    `log(1 - u)` are always finite.

    Args:
        shape: output shape.
        seed: a sanitised seed (`sanitize_seed`).
        dtype: float16, bfloat16, float32 or float64.

    Returns:
        A tensor of `shape` and `dtype`.

    Raises:
        ValueError: for another dtype.
    """
    words = tf.cast(seed, tf.uint32)
    if tf.as_dtype(dtype) == tf.float64:
        high, low = tf.unstack(_random_words(shape, _fold_in_words(words, (_HIGH, _LOW))))
        return _uniform53(high, low)
    return _uniform24(_random_words(shape, words), dtype)


def normal(
    shape: tf.TensorShape | Sequence[int] | tf.Tensor, seed: tf.Tensor, dtype: tf.DType
) -> tf.Tensor:
    """Standard normal numbers by the Box-Muller transform of two independent uniforms.

    `sqrt(-2 log u1) cos(2 pi u2)` with `u1 = uniform(shape, fold_in(seed, 1), float64)` and
    `u2 = uniform(shape, fold_in(seed, 2), float64)`; the four streams of words are drawn at once.

    Args:
        shape: output shape.
        seed: a sanitised seed (`sanitize_seed`).
        dtype: a floating dtype.

    Returns:
        A tensor of `shape` and `dtype`.
    """
    uniforms = _fold_in_words(tf.cast(seed, tf.uint32), (_FIRST_UNIFORM, _SECOND_UNIFORM))
    keys = tf.reshape(_fold_in_words(uniforms, (_HIGH, _LOW)), [4, 2])  # u1 high, u1 low, u2 ...
    high1, low1, high2, low2 = tf.unstack(_random_words(shape, keys))
    u1, u2 = _uniform53(high1, low1), _uniform53(high2, low2)
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
    top_bit = tf.bitwise.right_shift(_random_words(shape, tf.cast(seed, tf.uint32)), _u32(31))
    return tf.cast(2.0 * tf.cast(top_bit, tf.float64) - 1.0, dtype)
