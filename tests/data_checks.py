"""Helpers shared by the data-pipeline tests (`tests/data/`)."""

import numpy as np


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


def mirrored_count(images, sources):
    """How many of `images` match a mirrored source image and no unmirrored one."""
    plain, mirrored = set(as_keys(sources)), set(as_keys(sources[:, :, ::-1]))
    keys = as_keys(images)
    assert all(k in plain or k in mirrored for k in keys)
    return sum(k in mirrored and k not in plain for k in keys)
