"""The 2-D toy densities of the FFJORD and Residual Flow papers, and their `tf.data` pipeline.

`toy_samples` draws points with NumPy; `toy_dataset` makes a fixed set of them a pipeline with
the conventions of `tfp_resflow.data.datasets` (seeded endless training streams, reproducible
one-pass evaluation). `seed_words` and `batch_pipeline` are shared with `data`'s image pipelines.
"""

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfp_resflow.core import validation

__all__ = [
    "TOY_DATASETS",
    "TOY_NUM_SAMPLES",
    "batch_pipeline",
    "seed_words",
    "toy_dataset",
    "toy_samples",
]

TOY_NUM_SAMPLES = 50_000  # default points per toy split in `data.load_dataset`.
_TOY_SPLITS = {"train": 0, "validation": 1, "test": 2}


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.integers(8, size=n) * (np.pi / 4)
    centre = 2 * np.sqrt(2) * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    return centre + rng.normal(scale=0.5 / np.sqrt(2), size=(n, 2))


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    col = rng.integers(4, size=n)
    row = 2 * rng.integers(2, size=n) + col % 2  # same parity as col: the "black" cells
    return 2.0 * (np.stack([col, row], axis=-1) + rng.uniform(size=(n, 2))) - 4.0


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    theta = 3 * np.pi * np.sqrt(rng.uniform(size=n))  # sqrt: roughly uniform along the arc
    arm = rng.choice([-1.0, 1.0], size=(n, 1))
    curve = theta[:, None] / 3 * np.stack([-np.cos(theta), np.sin(theta)], axis=-1)
    return arm * curve + rng.normal(scale=0.1, size=(n, 2))


def _on_circles(rng: np.random.Generator, radii: Sequence[float], n: int) -> np.ndarray:
    radius = np.asarray(radii)[rng.integers(len(radii), size=n)]
    angle = rng.uniform(0, 2 * np.pi, size=n)
    return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    return _on_circles(rng, [0.75, 1.5, 2.25, 3.0], n) + rng.normal(scale=0.08, size=(n, 2))


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    return 3 * (_on_circles(rng, [0.5, 1.0], n) + rng.normal(scale=0.08, size=(n, 2)))


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    t = rng.uniform(0, np.pi, size=n)
    upper = np.stack([np.cos(t), np.sin(t)], axis=-1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], axis=-1)
    x = np.where(rng.integers(2, size=(n, 1)) == 1, upper, lower)
    return 2 * (x + rng.normal(scale=0.1, size=(n, 2))) + [-1.0, -0.2]


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial = 1 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    # Each arm bends away from its axis by 0.25 * exp(radius) radians.
    angle = rng.integers(5, size=n) * (2 * np.pi / 5) + 0.25 * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    return 2 * np.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], -1)


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    roll = t[:, None] * np.stack([np.cos(t), np.sin(t)], axis=-1)
    return (roll + rng.normal(size=(n, 2))) / 5


_TOY_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "rings": _rings,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "swissroll": _swissroll,
}
TOY_DATASETS = tuple(_TOY_GENERATORS)


def toy_samples(name: str, num_samples: int, *, seed: int | Sequence[int] | None) -> np.ndarray:
    """Draws points from a 2-D toy density of the FFJORD and Residual Flow papers.

    Scales follow FFJORD's `toy_data.py`, so every set fits in about [-4, 4]^2:

    - "8gaussians": 8 Gaussians (std 0.5/sqrt(2)) centred on a circle of radius 2 sqrt(2).
    - "checkerboard": uniform on the 8 cells of a 4x4 board of 2x2 squares on [-4, 4]^2 with
      floor(x1 / 2) + floor(x2 / 2) even.
    - "2spirals": two interleaved spirals r = theta / 3, theta in [0, 3 pi], noise std 0.1.
    - "rings": 4 concentric circles of radii 0.75, 1.5, 2.25, 3, noise std 0.08.
    - "moons": two interleaving half circles (scikit-learn's moons, noise 0.1), times 2,
      shifted by (-1, -0.2).
    - "pinwheel": 5 curved arms at radius about 2 (radial std 0.6, tangential std 0.2).
    - "circles": 2 concentric circles of radii 1.5 and 3, noise std 0.24.
    - "swissroll": the spiral r = t / 5, t in [1.5 pi, 4.5 pi], noise std 0.2.

    Args:
        name: one of `TOY_DATASETS`.
        num_samples: N, the number of points.
        seed: anything `np.random.default_rng` accepts; None for fresh randomness.

    Returns:
        float32 array of shape `[N, 2]`.

    Raises:
        ValueError: for an unknown name or a non-positive `num_samples`.
    """
    generator = _TOY_GENERATORS[validation.choice("name", name, TOY_DATASETS)]
    num_samples = validation.positive_integer("num_samples", num_samples)
    return generator(np.random.default_rng(seed), num_samples).astype(np.float32)


def seed_words(seed: int | None, count: int) -> list[int | None]:
    """Independent TF op seeds derived from one user seed (all None if it is None).

    Args:
        seed: the user's seed, or None.
        count: how many op seeds.

    Returns:
        `count` non-negative ints (or Nones), the same for the same `seed`.
    """
    if seed is None:
        return [None] * count
    return [int(w) for w in np.random.SeedSequence(seed).generate_state(count) >> 1]


def batch_pipeline(ds: tf.data.Dataset, batch_size: int, *, training: bool) -> tf.data.Dataset:
    """Batches and prefetches; training drops the last partial batch.

    A constant batch shape avoids a retrace (or an XLA recompile) at the end of every epoch.
    """
    return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


def toy_dataset(
    name: str,
    *,
    batch_size: int,
    num_samples: int,
    seed: int | None = None,
    split: str = "train",
    training: bool = True,
) -> tf.data.Dataset:
    """A `tf.data.Dataset` of a fixed set of points from a toy density (`toy_samples`).

    Args:
        name: one of `TOY_DATASETS`.
        batch_size: points per batch.
        num_samples: number of points in the set.
        seed: seeds both the points and the shuffling; None for fresh randomness (with
            `training=False`, None means 0).
        split: "train", "validation" or "test": independent sets for the same seed.
        training: if True, an endless stream reshuffled every epoch (see
            `tfp_resflow.data.datasets`); else one pass in a fixed order.

    Returns:
        A dataset of float32 batches of shape `[batch_size, 2]` (features only).

    Raises:
        ValueError: for an unknown name or split, or a non-positive count.
    """
    stream = _TOY_SPLITS[validation.choice("split", split, tuple(_TOY_SPLITS))]
    batch_size = validation.positive_integer("batch_size", batch_size)
    if seed is None and not training:
        seed = 0
    points = toy_samples(name, num_samples, seed=None if seed is None else [stream, seed])
    ds = tf.data.Dataset.from_tensor_slices(points)
    if training:
        ds = ds.repeat().shuffle(
            len(points), seed=seed_words(seed, 1)[0], reshuffle_each_iteration=False
        )
    return batch_pipeline(ds, batch_size, training=training)
