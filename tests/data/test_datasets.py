"""Tests of `datasets`: scikit-learn digits, tfds images (mocked, offline), dispatch."""

import numpy as np
import pytest
import tensorflow as tf
from data_checks import as_keys, assert_dequantized, epoch, levels, mirrored_count, stream
from sklearn.datasets import load_digits

from tfp_resflow.data import datasets, dequantization


@pytest.mark.parametrize(("level", "num_levels"), [(255, 256), (0, 256), (1, 17), (16, 17)])
def test_dequantized_values_stay_in_their_bin(level, num_levels):
    # (255 + u) / 256 rounds to 1.0 in float32 when u > 1 - 2**-17: ~8 of these 2**20 draws.
    n = tf.fill([2**20], level)
    x = dequantization.dequantize(n, num_levels, tf.constant([7, 0], tf.int64)).numpy()
    assert x.dtype == np.float32
    np.testing.assert_array_equal(levels(x, num_levels), level)
    assert x.max() < 1.0


# ---- digits ----------------------------------------------------------------------------------

K = datasets.DIGITS_NUM_LEVELS
DIGITS = load_digits().images.astype(np.int64)[..., None]


def test_digits_split_is_a_partition_with_exact_levels():
    train = epoch(datasets.digits_dataset("train", batch_size=256, training=False))
    test = epoch(datasets.digits_dataset("test", batch_size=256, training=False))
    assert train.shape == (1500, *datasets.DIGITS_SHAPE)
    assert test.shape == (297, *datasets.DIGITS_SHAPE)
    assert_dequantized(np.concatenate([train, test]), K)
    assert as_keys(np.concatenate([levels(train, K), levels(test, K)])) == as_keys(DIGITS)


def test_digits_training_is_seeded_and_fresh_each_pass():
    make = lambda seed: datasets.digits_dataset("train", batch_size=100, seed=seed)  # noqa: E731
    ds, twin = make(3), make(3)
    first, second = stream(ds, 15), stream(ds, 15, skip=15)  # 1500 images per epoch
    np.testing.assert_array_equal(stream(twin, 15), first)
    np.testing.assert_array_equal(stream(twin, 15, skip=15), second)
    np.testing.assert_array_equal(stream(ds, 15), first)  # a new iterator: the same stream
    # Fresh noise every epoch, not only a new order: no image comes back with the same values.
    assert not {im.tobytes() for im in first} & {im.tobytes() for im in second}
    assert not np.array_equal(stream(make(4), 15), first)
    assert first.shape == (1500, 8, 8, 1)
    assert_dequantized(first, K)


def test_digits_evaluation_is_reproducible():
    ds = datasets.digits_dataset("test", batch_size=64, training=False)
    x = epoch(ds)
    assert x.shape == (297, 8, 8, 1)  # the partial last batch is kept
    np.testing.assert_array_equal(epoch(ds), x)
    np.testing.assert_array_equal(
        epoch(datasets.digits_dataset("test", batch_size=8, seed=0, training=False)), x
    )
    assert not np.array_equal(
        epoch(datasets.digits_dataset("test", batch_size=64, seed=1, training=False)), x
    )


@pytest.mark.parametrize("flip", [False, True])
def test_digits_flips(flip):
    x = stream(datasets.digits_dataset("train", batch_size=500, seed=0, flip=flip), 3)
    count = mirrored_count(levels(x, K), DIGITS)
    if flip:  # each image is mirrored with probability 1/2 (a few digits are symmetric)
        assert 0.4 * len(x) < count < 0.6 * len(x)
    else:
        assert count == 0


# ---- tfds images, mocked offline --------------------------------------------------------------


# ---- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: datasets.digits_dataset("valid", batch_size=2),
            r"split must be one of \('train', 'test'\); got 'valid'",
        ),
        (
            lambda: datasets.digits_dataset("test", batch_size=2, training=False, flip=True),
            "flip=True",
        ),
        (
            lambda: datasets.load_dataset("rings", batch_size=2, num_levels=8),
            "num_levels does not apply",
        ),
        (
            lambda: datasets.load_dataset("digits", batch_size=2, num_samples=8),
            "num_samples does not",
        ),
        (
            lambda: datasets.load_dataset("mnist", batch_size=2, num_samples=8),
            "num_samples does not apply to dataset 'mnist'",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_load_dataset_dispatch():
    ds, shape, k = datasets.load_dataset("checkerboard", batch_size=10, num_samples=50, seed=0)
    assert shape == (2,)
    assert k is None
    assert stream(ds, 5).shape == (50, 2)
    assert datasets.num_examples("checkerboard", num_samples=50) == 50
    assert datasets.num_examples("digits", "train") == 1500
    assert datasets.num_examples("digits", "test") == 297
    # Offline sets ignore tfds' data_dir and download.
    ds, shape, k = datasets.load_dataset("digits", "test", batch_size=10, download=True)
    assert shape == (8, 8, 1)
    assert k == 17
    assert epoch(ds).shape == (297, 8, 8, 1)


def test_digits_come_with_their_labels():
    ds = datasets.digits_dataset("test", batch_size=100, training=False, labels=True)
    x = epoch(ds.map(lambda x, y: x))
    labels = epoch(ds.map(lambda x, y: y))
    assert labels.dtype == np.int32
    unlabelled = datasets.digits_dataset("test", batch_size=100, training=False)
    np.testing.assert_array_equal(x, epoch(unlabelled))  # the same images, the same order
    # Evaluation keeps the split's order: the permutation by split_seed 0, after the train part.
    part = np.random.default_rng(0).permutation(len(DIGITS))[datasets.DIGITS_NUM_TRAIN :]
    np.testing.assert_array_equal(levels(x, K), DIGITS[part])
    np.testing.assert_array_equal(labels, load_digits().target[part])
    train, shape, k = datasets.load_dataset("digits", batch_size=8, seed=0, labels=True)
    images, targets = next(iter(train))
    assert (images.shape, targets.shape, shape, k) == ((8, 8, 8, 1), (8,), (8, 8, 1), 17)
    assert datasets.num_classes("digits") == 10


def test_toy_sets_have_no_labels():
    with pytest.raises(ValueError, match="the toy set 'moons' has no labels"):
        datasets.load_dataset("moons", batch_size=2, num_samples=8, labels=True)
    with pytest.raises(ValueError, match="has no labels"):
        datasets.num_classes("moons")
