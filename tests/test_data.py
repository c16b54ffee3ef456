"""Tests of `tfp_resflow.data`: scikit-learn digits, tfds images (mocked, offline), dispatch."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from tfp_resflow import data


def epoch(ds):
    """All batches of a finite (evaluation) pipeline."""
    return np.concatenate([b.numpy() for b in ds])


def stream(ds, num_batches, *, skip=0):
    """Batches `skip .. skip + num_batches` of a new iterator over an endless training stream."""
    batches = [b.numpy() for b, _ in zip(ds, range(skip + num_batches), strict=False)]
    return np.concatenate(batches[skip:])


def levels(x, k):
    """Integer level of each dequantised value; float64 so the product k * x is exact enough."""
    return np.floor(x.astype(np.float64) * k).astype(np.int64)


def as_keys(images):
    return sorted(im.tobytes() for im in np.asarray(images, np.int64))


def assert_dequantized(x, k):
    assert x.dtype == np.float32
    assert x.min() >= 0.0
    assert x.max() < 1.0
    frac = x.astype(np.float64) * k - levels(x, k)
    # U(0, 1) noise: mean 1/2 and std 1/sqrt(12) = 0.289; 0.05 is many standard errors here.
    assert abs(frac.mean() - 0.5) < 0.05
    assert abs(frac.std() - 0.289) < 0.05


@pytest.mark.parametrize(("level", "num_levels"), [(255, 256), (0, 256), (1, 17), (16, 17)])
def test_dequantized_values_stay_in_their_bin(level, num_levels):
    # (255 + u) / 256 rounds to 1.0 in float32 when u > 1 - 2**-17: ~8 of these 2**20 draws.
    n = tf.fill([2**20], level)
    x = data._dequantize(n, num_levels, tf.constant([7, 0], tf.int64)).numpy()
    assert x.dtype == np.float32
    np.testing.assert_array_equal(levels(x, num_levels), level)
    assert x.max() < 1.0


# ---- digits ----------------------------------------------------------------------------------

K = data.DIGITS_NUM_LEVELS
DIGITS = load_digits().images.astype(np.int64)[..., None]


def test_digits_split_is_a_partition_with_exact_levels():
    train = epoch(data.digits_dataset("train", batch_size=256, training=False))
    test = epoch(data.digits_dataset("test", batch_size=256, training=False))
    assert train.shape == (1500, *data.DIGITS_SHAPE)
    assert test.shape == (297, *data.DIGITS_SHAPE)
    assert_dequantized(np.concatenate([train, test]), K)
    assert as_keys(np.concatenate([levels(train, K), levels(test, K)])) == as_keys(DIGITS)


def test_digits_training_is_seeded_and_fresh_each_pass():
    make = lambda seed: data.digits_dataset("train", batch_size=100, seed=seed)  # noqa: E731
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
    ds = data.digits_dataset("test", batch_size=64, training=False)
    x = epoch(ds)
    assert x.shape == (297, 8, 8, 1)  # the partial last batch is kept
    np.testing.assert_array_equal(epoch(ds), x)
    np.testing.assert_array_equal(
        epoch(data.digits_dataset("test", batch_size=8, seed=0, training=False)), x
    )
    assert not np.array_equal(
        epoch(data.digits_dataset("test", batch_size=64, seed=1, training=False)), x
    )


def mirrored_count(images, sources):
    """How many of `images` match a mirrored source image and no unmirrored one."""
    plain, mirrored = set(as_keys(sources)), set(as_keys(sources[:, :, ::-1]))
    keys = as_keys(images)
    assert all(k in plain or k in mirrored for k in keys)
    return sum(k in mirrored and k not in plain for k in keys)


@pytest.mark.parametrize("flip", [False, True])
def test_digits_flips(flip):
    x = stream(data.digits_dataset("train", batch_size=500, seed=0, flip=flip), 3)
    count = mirrored_count(levels(x, K), DIGITS)
    if flip:  # each image is mirrored with probability 1/2 (a few digits are symmetric)
        assert 0.4 * len(x) < count < 0.6 * len(x)
    else:
        assert count == 0


# ---- tfds images, mocked offline --------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
@pytest.mark.parametrize("num_levels", [256, 32])
def test_tfds_images(tmp_path, name, shape, num_levels):
    with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
        ds, event_shape, k = data.load_dataset(
            name, "test", batch_size=5, num_levels=num_levels, data_dir=str(tmp_path)
        )
        raw = np.stack(
            [
                ex["image"]
                for ex in tfds.as_numpy(tfds.load(name, split="test", data_dir=str(tmp_path)))
            ]
        )
        x = epoch(ds)
        np.testing.assert_array_equal(epoch(ds), x)  # evaluation pipeline: reproducible
        train, info = data.image_dataset(
            name, "train", batch_size=4, seed=0, flip=True, data_dir=str(tmp_path)
        )
        flipped = stream(train, 4)
    assert event_shape == shape
    assert k == num_levels
    assert info.name == name
    assert x.shape == (16, *shape)
    assert_dequantized(x, num_levels)
    # Bits are reduced by merging whole bins: floor(x * k) == floor(n * k / 256).
    np.testing.assert_array_equal(levels(x, num_levels), raw.astype(np.int64) * num_levels // 256)
    assert flipped.shape == (16, *shape)
    assert 0 < mirrored_count(levels(flipped, 256), raw) < 16  # random, not all-or-nothing


def test_missing_tfds_data_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared"):
        data.image_dataset("mnist", "train", batch_size=4, data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


# ---- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: data.digits_dataset("valid", batch_size=2),
            r"split must be one of \('train', 'test'\); got 'valid'",
        ),
        (lambda: data.digits_dataset("test", batch_size=2, training=False, flip=True), "flip=True"),
        (lambda: data.image_dataset("mnist", "train", batch_size=2, num_levels=257), "got 257"),
        (lambda: data.image_dataset("mnist", "train", batch_size=2, num_levels=1), "got 1"),
        (lambda: data.image_dataset("no_such_set", "train", batch_size=2), "no_such_set"),
        (
            lambda: data.load_dataset("rings", batch_size=2, num_levels=8),
            "num_levels does not apply",
        ),
        (lambda: data.load_dataset("digits", batch_size=2, num_samples=8), "num_samples does not"),
        (
            lambda: data.load_dataset("mnist", batch_size=2, num_samples=8),
            "num_samples does not apply to dataset 'mnist'",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_load_dataset_dispatch():
    ds, shape, k = data.load_dataset("checkerboard", batch_size=10, num_samples=50, seed=0)
    assert shape == (2,)
    assert k is None
    assert stream(ds, 5).shape == (50, 2)
    assert data.num_examples("checkerboard", num_samples=50) == 50
    assert data.num_examples("digits", "train") == 1500
    assert data.num_examples("digits", "test") == 297
    # Offline sets ignore tfds' data_dir and download.
    ds, shape, k = data.load_dataset("digits", "test", batch_size=10, download=True)
    assert shape == (8, 8, 1)
    assert k == 17
    assert epoch(ds).shape == (297, 8, 8, 1)
