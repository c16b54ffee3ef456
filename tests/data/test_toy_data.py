"""Tests of `tfp_resflow.data.toy_data`: the 2-D toy densities and their pipeline."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial import cKDTree

from tfp_resflow.data import datasets, toy_data


def epoch(ds):
    """All batches of a finite (evaluation) pipeline."""
    return np.concatenate([b.numpy() for b in ds])


def stream(ds, num_batches, *, skip=0):
    """Batches `skip .. skip + num_batches` of a new iterator over an endless training stream."""
    batches = [b.numpy() for b, _ in zip(ds, range(skip + num_batches), strict=False)]
    return np.concatenate(batches[skip:])


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
    assert set(TOY_CHECKS) == set(toy_data.TOY_DATASETS)


@pytest.mark.parametrize("name", TOY_CHECKS)
def test_toy_samples(name):
    x = toy_data.toy_samples(name, N, seed=0)
    assert x.shape == (N, 2)
    assert x.dtype == np.float32
    assert np.all(np.abs(x) < 6)
    np.testing.assert_array_equal(x, toy_data.toy_samples(name, N, seed=0))
    assert not np.allclose(x, toy_data.toy_samples(name, N, seed=1))
    TOY_CHECKS[name](x)


def test_toy_dataset_batches_and_seeds():
    make = lambda **kw: toy_data.toy_dataset("moons", batch_size=32, num_samples=100, **kw)  # noqa: E731
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
    points = toy_data.toy_samples("moons", 100, seed=[0, 5])
    seen = stream(ds, 9)
    assert {p.tobytes() for p in seen} == {p.tobytes() for p in points}

    test = make(seed=5, split="test", training=False)
    np.testing.assert_array_equal(epoch(test), epoch(test))
    points = toy_data.toy_samples("moons", 100, seed=[2, 5])
    np.testing.assert_array_equal(epoch(test), points)  # all points, in order
    assert not np.allclose(points, toy_data.toy_samples("moons", 100, seed=[0, 5]))  # train split


def test_data_re_exports_the_toy_sets():
    for name in ("TOY_DATASETS", "TOY_NUM_SAMPLES", "toy_dataset", "toy_samples"):
        assert getattr(datasets, name) is getattr(toy_data, name)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: toy_data.toy_samples("spiral", 10, seed=0),
            r"name must be one of \('8gaussians', 'checkerboard'.*got 'spiral'",
        ),
        (
            lambda: toy_data.toy_samples("moons", 0, seed=0),
            "num_samples must be a positive integer; got 0",
        ),
        (
            lambda: toy_data.toy_dataset("moons", batch_size=0, num_samples=10),
            "batch_size .* got 0",
        ),
        (
            lambda: toy_data.toy_dataset("moons", batch_size=2, num_samples=10, split="val"),
            "split must be one of .*got 'val'",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
