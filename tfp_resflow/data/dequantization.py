"""Integer images to dequantised float batches: the pipeline every image data set shares.

Images with k levels per dimension are uniformly dequantised and scaled to [0, 1):

    x = (n + u) / k,    n in {0, ..., k - 1},  u ~ U(0, 1)

Fewer levels than the source's are made by merging equal-width bins before the noise
(`tfp_resflow.data.datasets` states the conventions). Used by `data` (the digits) and `tfds_images`
(any tfds image set), so that neither needs the other.
"""

import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.data.toy_data import batch_pipeline, seed_words

__all__ = ["check_num_levels", "dequantize", "image_pipeline"]


def dequantize(n: tf.Tensor, num_levels: int, seed: tf.Tensor) -> tf.Tensor:
    """`(n + u) / k` in float32, guaranteed to lie in the bin `[n / k, (n + 1) / k)`."""
    n = tf.cast(n, tf.float64)
    u = tf.random.stateless_uniform(tf.shape(n), seed, dtype=tf.float64)
    x = tf.cast((n + u) / num_levels, tf.float32)
    # Rounding to float32 can leave the bin, e.g. (255 + u) / 256 -> 1.0 for u > 1 - 2**-17:
    # step one float32 back inside (the bins are more than 2**-9 wide, so one step suffices).
    x64 = tf.cast(x, tf.float64)
    x = tf.where(x64 >= (n + 1) / num_levels, tf.math.nextafter(x, tf.zeros_like(x)), x)
    return tf.where(x64 < n / num_levels, tf.math.nextafter(x, tf.ones_like(x)), x)


def image_pipeline(
    images: tf.data.Dataset,
    *,
    labels: tf.data.Dataset | None = None,
    source_levels: int,
    num_levels: int,
    batch_size: int,
    seed: int | None,
    training: bool,
    flip: bool,
    shuffle_buffer: int,
) -> tf.data.Dataset:
    """Integer images `[H, W, C]` with `source_levels` levels -> batches of dequantised floats.

    With `labels` (a dataset of int labels in the images' order) the batches are `(x, label)`.
    """
    if not training:
        if flip:
            raise ValueError("flip=True needs training=True (evaluation is deterministic).")
        seed = 0 if seed is None else seed
    shuffle_seed, noise_seed = seed_words(seed, 2)
    if labels is not None:  # shuffled together with their images
        images = tf.data.Dataset.zip(images, labels.map(lambda y: tf.cast(y, tf.int32)))
    if training:
        images = images.repeat().shuffle(
            shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
        )
    # One random int64 per example keys its noise and flip: an endless stream, so every epoch
    # of a training stream gets new keys; with training=False the same keys come back on every
    # pass. Either way, a new iterator starts the same sequence.
    keys = tf.data.Dataset.random(seed=noise_seed, rerandomize_each_iteration=False)

    def transform(image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
        n = (tf.cast(image, tf.int32) * num_levels) // source_levels
        if flip:
            n = tf.image.stateless_random_flip_left_right(n, tf.stack([key, 1]))
        return dequantize(n, num_levels, tf.stack([key, 0]))

    def transform_labelled(example: tuple, key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = example
        return transform(image, key), label

    function = transform if labels is None else transform_labelled
    ds = tf.data.Dataset.zip(images, keys).map(function, num_parallel_calls=tf.data.AUTOTUNE)
    return batch_pipeline(ds, batch_size, training=training)


def check_num_levels(num_levels: object, source_levels: int) -> int:
    """`num_levels`, an integer in [2, source_levels] (fewer levels merge bins)."""
    num_levels = validation.integer("num_levels", num_levels, 2)
    if num_levels > source_levels:
        validation.fail("num_levels", f"an integer in [2, {source_levels}]", num_levels)
    return num_levels
