"""Tests of `tfp_resflow.data`: toy sets, scikit-learn digits, tfds images (mocked, offline)."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy.spatial import cKDTree
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


# ---- toy sets --------------------------------------------------------------------------------

N = 4000


def distance_to_curve(x, curve):
    return cKDTree(curve).query(x)[0]


def check_8gaussians(x):
    angle = np.arange(8) * np.pi / 4
    centres = 2 * np.sqrt(2) * np.stack([np.cos(angle), np.sin(angle)], -1)
    nearest = np.argmin(np.linalg.norm(x[:, None] - centres, axis=-1), axis=1)
    for i in range(8):
        cluster = x[nearest == i]
        # ~500 points each, std 0.354: means within 0.1 (> 6 standard errors).
        assert abs(len(cluster) / N - 1 / 8) < 0.03
        np.testing.assert_allclose(cluster.mean(0), centres[i], atol=0.1)
        np.testing.assert_allclose(cluster.std(0), 0.5 / np.sqrt(2), atol=0.05)


def check_checkerboard(x):
    assert x.min() >= -4
    assert x.max() < 4
    cell = np.floor(x / 2).astype(int)
    assert np.all(cell.sum(1) % 2 == 0)
    counts = np.unique(cell, axis=0, return_counts=True)[1]
    assert len(counts) == 8
    assert counts.min() > N / 8 * 0.8


def check_2spirals(x):
    theta = np.linspace(0, 3 * np.pi, 10_000)
    arm = theta[:, None] / 3 * np.stack([-np.cos(theta), np.sin(theta)], -1)
    # Noise std 0.1 per axis: the distance to the curve is below 0.5 with probability > 1-1e-5.
    assert np.mean(distance_to_curve(x, np.concatenate([arm, -arm])) < 0.5) > 0.999


def check_rings(x):
    r = np.linalg.norm(x, axis=1)
    ring = np.argmin(np.abs(r[:, None] - [0.75, 1.5, 2.25, 3.0]), axis=1)
    # Noise std 0.08: every point within 0.35 (4.4 std) of its ring; rings equally likely.
    assert np.all(np.abs(r - 0.75 * (ring + 1)) < 0.35)
    assert np.all(np.abs(np.bincount(ring, minlength=4) / N - 0.25) < 0.04)


def check_circles(x):
    r = np.linalg.norm(x, axis=1)
    outer = r > 2.25
    assert abs(outer.mean() - 0.5) < 0.04
    np.testing.assert_allclose([r[~outer].mean(), r[outer].mean()], [1.5, 3.0], atol=0.05)


def check_moons(x):
    t = np.linspace(0, np.pi, 2000)
    upper = np.stack([np.cos(t), np.sin(t)], -1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], -1)
    curve = 2 * np.concatenate([upper, lower]) + [-1, -0.2]
    # The means of the two half circles are (0, 2/pi) and (1, 0.5 - 2/pi), mapped by 2x + shift.
    np.testing.assert_allclose(x.mean(0), [0.0, 0.3], atol=0.05)
    # Noise std 0.2 per axis after scaling: P(|noise| < 0.4) = 1 - exp(-2) = 0.86.
    assert np.mean(distance_to_curve(x, curve) < 0.4) > 0.85


def check_pinwheel(x):
    sector = np.floor(np.arctan2(x[:, 1], x[:, 0]) / (2 * np.pi / 5)).astype(int) % 5
    assert np.all(np.abs(np.bincount(sector, minlength=5) / N - 0.2) < 0.04)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 2.0, atol=0.1)


def check_swissroll(x):
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 10_000)
    curve = t[:, None] / 5 * np.stack([np.cos(t), np.sin(t)], -1)
    # Noise std 0.2 per axis: P(|noise| < 0.4) = 1 - exp(-2) = 0.86 bounds the fraction below.
    assert np.mean(distance_to_curve(x, curve) < 0.4) > 0.85


TOY_CHECKS = {
    "8gaussians": check_8gaussians,
    "checkerboard": check_checkerboard,
    "2spirals": check_2spirals,
    "rings": check_rings,
    "moons": check_moons,
    "pinwheel": check_pinwheel,
    "circles": check_circles,
    "swissroll": check_swissroll,
}


def test_every_toy_set_has_a_check():
    assert set(TOY_CHECKS) == set(data.TOY_DATASETS)


@pytest.mark.parametrize("name", TOY_CHECKS)
def test_toy_samples(name):
    x = data.toy_samples(name, N, seed=0)
    assert x.shape == (N, 2)
    assert x.dtype == np.float32
    assert np.all(np.abs(x) < 6)
    np.testing.assert_array_equal(x, data.toy_samples(name, N, seed=0))
    assert not np.allclose(x, data.toy_samples(name, N, seed=1))
    TOY_CHECKS[name](x)


def test_toy_dataset_batches_and_seeds():
    make = lambda **kw: data.toy_dataset("moons", batch_size=32, num_samples=100, **kw)  # noqa: E731
    ds = make(seed=5)
    assert ds.element_spec.shape.as_list() == [32, 2]
    assert ds.cardinality() == tf.data.INFINITE_CARDINALITY  # an endless training stream
    first, second = stream(ds, 3), stream(ds, 3, skip=3)
    assert first.shape == (96, 2)
    assert first.dtype == np.float32
    assert not np.array_equal(first, second)  # reshuffled as the stream goes on
    # Every new iterator (of this dataset or of a twin) starts the same stream, so an extra
    # iterator (Keras makes one under tf.distribute) cannot shift the data order.
    np.testing.assert_array_equal(stream(ds, 6), np.concatenate([first, second]))
    np.testing.assert_array_equal(stream(make(seed=5), 6), np.concatenate([first, second]))
    assert not np.array_equal(stream(make(seed=6), 3), first)
    # The stream covers the set: 3 * 100 points hold every point about 3 times.
    points = data.toy_samples("moons", 100, seed=[0, 5])
    seen = stream(ds, 9)
    assert {p.tobytes() for p in seen} == {p.tobytes() for p in points}

    test = make(seed=5, split="test", training=False)
    np.testing.assert_array_equal(epoch(test), epoch(test))
    points = data.toy_samples("moons", 100, seed=[2, 5])
    np.testing.assert_array_equal(epoch(test), points)  # all points, in order
    assert not np.allclose(points, data.toy_samples("moons", 100, seed=[0, 5]))  # train split


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
        (lambda: data.toy_samples("spiral", 10, seed=0), "'spiral'; valid: 8gaussians, checker"),
        (
            lambda: data.toy_samples("moons", 0, seed=0),
            "num_samples must be a positive integer; got 0",
        ),
        (lambda: data.toy_dataset("moons", batch_size=0, num_samples=10), "batch_size .* got 0"),
        (
            lambda: data.toy_dataset("moons", batch_size=2, num_samples=10, split="val"),
            "split 'val'",
        ),
        (lambda: data.digits_dataset("valid", batch_size=2), "split 'valid'; valid: train, test"),
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
