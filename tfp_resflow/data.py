"""`tf.data` pipelines: 2-D toy sets, the scikit-learn 8x8 digits, and any tfds image set.

Images with k levels per dimension are uniformly dequantised and scaled to [0, 1):

    x = (n + u) / k,    n in {0, ..., k - 1},  u ~ U(0, 1)

the convention of `tfp_resflow.bits`. Fewer levels than the source's are made by merging
equal-width bins, `n_k = floor(n_src * k / k_src)`; this reduction happens before the noise, so
bins never overlap (Chen et al.'s 5-bit CelebA-HQ code adds noise of width 1/31 to values on a
1/32 grid). Nothing with a Jacobian (logit, normalisation) is done here: it belongs to the model.

Randomness is seeded per example with stateless TF ops. With `training=True` a pipeline is an
endless stream (repeat, then shuffle): every epoch is reshuffled with fresh noise (and flips),
from `seed` if given or fresh otherwise. A seeded stream is the same every time it is iterated,
however many iterators were made before: Keras peeks at one batch through an extra iterator
under `tf.distribute` strategies, and a per-iteration reshuffle would then hand a distributed
run another data order than a single-device run. `num_examples` gives the size of one epoch.
With `training=False` a pipeline is one pass in file order with identical values on every pass
(seed 0 if None), so evaluation numbers are reproducible. Multi-worker runs that shard by data
need a seed, so that every worker builds the same order. Nothing is downloaded unless
`download=True` is passed (see `image_dataset`).
"""

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

__all__ = [
    "DIGITS_NUM_LEVELS",
    "DIGITS_NUM_TRAIN",
    "DIGITS_SHAPE",
    "TOY_DATASETS",
    "TOY_NUM_SAMPLES",
    "digits_dataset",
    "image_dataset",
    "load_dataset",
    "num_examples",
    "toy_dataset",
    "toy_samples",
]

DIGITS_NUM_LEVELS = 17  # load_digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap).
DIGITS_SHAPE = (8, 8, 1)
DIGITS_NUM_TRAIN = 1500  # of 1797 images; the other 297 form the test split.
TOY_NUM_SAMPLES = 50_000  # default points per toy split in `load_dataset`.
_SHUFFLE_BUFFER = 10_000  # tfds examples are already shuffled on disk when prepared.
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


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid: {', '.join(choices)}.")
    return value


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
    generator = _TOY_GENERATORS[_check_choice("toy dataset", name, TOY_DATASETS)]
    num_samples = _check_positive_int("num_samples", num_samples)
    return generator(np.random.default_rng(seed), num_samples).astype(np.float32)


def _seed_words(seed: int | None, count: int) -> list[int | None]:
    """Independent TF op seeds derived from one user seed (all None if it is None)."""
    if seed is None:
        return [None] * count
    return [int(w) for w in np.random.SeedSequence(seed).generate_state(count) >> 1]


def _batch(ds: tf.data.Dataset, batch_size: int, *, training: bool) -> tf.data.Dataset:
    # Training drops the last partial batch: a constant batch shape avoids a retrace (or an XLA
    # recompile) at the end of every epoch.
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
        training: if True, an endless stream reshuffled every epoch (see the module
            docstring); else one pass in a fixed order.

    Returns:
        A dataset of float32 batches of shape `[batch_size, 2]` (features only).

    Raises:
        ValueError: for an unknown name or split, or a non-positive count.
    """
    stream = _TOY_SPLITS[_check_choice("split", split, tuple(_TOY_SPLITS))]
    batch_size = _check_positive_int("batch_size", batch_size)
    if seed is None and not training:
        seed = 0
    points = toy_samples(name, num_samples, seed=None if seed is None else [stream, seed])
    ds = tf.data.Dataset.from_tensor_slices(points)
    if training:
        ds = ds.repeat().shuffle(
            len(points), seed=_seed_words(seed, 1)[0], reshuffle_each_iteration=False
        )
    return _batch(ds, batch_size, training=training)


def _dequantize(n: tf.Tensor, num_levels: int, seed: tf.Tensor) -> tf.Tensor:
    """`(n + u) / k` in float32, guaranteed to lie in the bin `[n / k, (n + 1) / k)`."""
    n = tf.cast(n, tf.float64)
    u = tf.random.stateless_uniform(tf.shape(n), seed, dtype=tf.float64)
    x = tf.cast((n + u) / num_levels, tf.float32)
    # Rounding to float32 can leave the bin, e.g. (255 + u) / 256 -> 1.0 for u > 1 - 2**-17:
    # step one float32 back inside (the bins are more than 2**-9 wide, so one step suffices).
    x64 = tf.cast(x, tf.float64)
    x = tf.where(x64 >= (n + 1) / num_levels, tf.math.nextafter(x, tf.zeros_like(x)), x)
    return tf.where(x64 < n / num_levels, tf.math.nextafter(x, tf.ones_like(x)), x)


def _image_pipeline(
    images: tf.data.Dataset,
    *,
    source_levels: int,
    num_levels: int,
    batch_size: int,
    seed: int | None,
    training: bool,
    flip: bool,
    shuffle_buffer: int,
) -> tf.data.Dataset:
    """Integer images `[H, W, C]` with `source_levels` levels -> batches of dequantised floats."""
    if not training:
        if flip:
            raise ValueError("flip=True needs training=True (evaluation is deterministic).")
        seed = 0 if seed is None else seed
    shuffle_seed, noise_seed = _seed_words(seed, 2)
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
        return _dequantize(n, num_levels, tf.stack([key, 0]))

    ds = tf.data.Dataset.zip(images, keys).map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return _batch(ds, batch_size, training=training)


def _check_num_levels(num_levels: object, source_levels: int) -> int:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int | np.integer):
        raise ValueError(f"num_levels must be an integer; got {num_levels!r}.")
    if not 2 <= num_levels <= source_levels:
        raise ValueError(f"num_levels must be in [2, {source_levels}]; got {num_levels!r}.")
    return int(num_levels)


def digits_dataset(
    split: str,
    *,
    batch_size: int,
    seed: int | None = None,
    training: bool = True,
    flip: bool = False,
    split_seed: int = 0,
) -> tf.data.Dataset:
    """The 8x8 handwritten digits shipped with scikit-learn: an offline image set.

    The 1797 images (values 0..16, 17 levels) are permuted by `split_seed` and cut into
    `DIGITS_NUM_TRAIN` = 1500 "train" and 297 "test" images, then dequantised with k = 17.

    Args:
        split: "train" or "test".
        batch_size: images per batch.
        seed: seeds shuffling, noise and flips (see the module docstring).
        training: an endless stream, reshuffled with fresh noise every epoch (see the module
            docstring); False gives the deterministic one-pass evaluation pipeline.
        flip: random horizontal flips (training only).
        split_seed: seed of the fixed train/test permutation, independent of `seed`.

    Returns:
        A dataset of float32 batches of shape `[batch_size, 8, 8, 1]` in [0, 1).

    Raises:
        ValueError: for an unknown split or bad arguments.
    """
    _check_choice("split", split, ("train", "test"))
    batch_size = _check_positive_int("batch_size", batch_size)
    images = load_digits().images.astype(np.uint8)[..., None]
    order = np.random.default_rng(split_seed).permutation(len(images))
    part = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    return _image_pipeline(
        tf.data.Dataset.from_tensor_slices(images[part]),
        source_levels=DIGITS_NUM_LEVELS,
        num_levels=DIGITS_NUM_LEVELS,
        batch_size=batch_size,
        seed=seed,
        training=training,
        flip=flip,
        shuffle_buffer=len(part),
    )


def _image_key(name: str, features: tfds.features.FeaturesDict) -> str:
    """The image feature of a tfds dataset: "image" if present, else its only uint8 image."""
    keys = [k for k in features.keys() if isinstance(features[k], tfds.features.Image)]
    key = "image" if "image" in keys else (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise ValueError(f"tfds dataset {name!r} has no single image feature; got {keys}.")
    feature = features[key]
    if feature.np_dtype != np.uint8 or None in feature.shape:
        raise ValueError(
            f"tfds dataset {name!r}: images must be uint8 of a fixed shape; got "
            f"{feature.np_dtype} {feature.shape}."
        )
    return key


def image_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    num_levels: int = 256,
    seed: int | None = None,
    training: bool = True,
    flip: bool = False,
    data_dir: str | None = None,
    download: bool = False,
) -> tuple[tf.data.Dataset, tfds.core.DatasetInfo]:
    """Any 8-bit tensorflow-datasets image set by name, dequantised to [0, 1).

    Offline by default: the data must already be prepared in `data_dir` (default
    `$TFDS_DATA_DIR` or `~/tensorflow_datasets`). With internet, pass `download=True` once,
    or run `tfds build NAME --data_dir DIR`; offline, copy a prepared `NAME/VERSION` folder.

    Args:
        name: tfds name, e.g. "mnist", "cifar10", "downsampled_imagenet/32x32".
        split: tfds split string, e.g. "train", "test", "train[:90%]".
        batch_size: images per batch.
        num_levels: k <= 256; fewer levels merge bins, `n_k = floor(n_256 * k / 256)`.
        seed: seeds shuffling, noise and flips (see the module docstring).
        training: an endless stream, reshuffled with fresh noise every epoch (see the module
            docstring); False gives the deterministic one-pass evaluation pipeline.
        flip: random horizontal flips (training only), as Chen et al. use on CIFAR-10.
        data_dir: tfds data directory.
        download: let tfds download and prepare the data if missing (needs internet).

    Returns:
        A dataset of float32 batches `[batch_size, H, W, C]` in [0, 1) (features only), and
        the tfds `DatasetInfo`.

    Raises:
        ValueError: for an unknown dataset (tfds' `DatasetNotFoundError`) or bad arguments.
        FileNotFoundError: if the data is not prepared and `download` is False.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    num_levels = _check_num_levels(num_levels, 256)
    builder = tfds.builder(name, data_dir=data_dir)
    key = _image_key(name, builder.info.features)
    if download:
        builder.download_and_prepare()
    try:
        examples = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # tfds' "could not find data" error
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Nothing is downloaded "
            "by default: pass download=True (needs internet), run `tfds build`, or point "
            "data_dir / TFDS_DATA_DIR at a folder holding the prepared data."
        ) from e
    images = examples.map(lambda example: example[key], num_parallel_calls=tf.data.AUTOTUNE)
    ds = _image_pipeline(
        images,
        source_levels=256,
        num_levels=num_levels,
        batch_size=batch_size,
        seed=seed,
        training=training,
        flip=flip,
        shuffle_buffer=_SHUFFLE_BUFFER,
    )
    return ds, builder.info


def load_dataset(
    name: str,
    split: str = "train",
    *,
    batch_size: int,
    seed: int | None = None,
    training: bool | None = None,
    flip: bool = False,
    num_levels: int | None = None,
    num_samples: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> tuple[tf.data.Dataset, tuple[int, ...], int | None]:
    """One entry point for the training script: toy sets, "digits", or any tfds image set.

    Args:
        name: one of `TOY_DATASETS`, "digits", or a tfds name ("mnist", "cifar10", ...).
        split: "train", "test" (toy sets also "validation"; tfds any split string).
        batch_size: examples per batch.
        seed: seeds everything random (see the module docstring); None for fresh randomness.
        training: the training stream (endless, reshuffled with fresh noise every epoch) or
            the deterministic one-pass evaluation pipeline; None means True for splits
            starting with "train".
        flip: random horizontal flips (image sets, training only).
        num_levels: levels k for tfds images (default 256); digits always use 17.
        num_samples: points per toy split (default `TOY_NUM_SAMPLES` = 50 000).
        data_dir: tfds data directory (ignored by the offline toy and digits sets).
        download: let tfds download missing data (needs internet; off by default; ignored by
            the offline sets).

    Returns:
        `(dataset, event_shape, num_levels)`: the dataset of float32 feature batches, the
        shape of one example, and k for bits/dim (None for continuous toy data).

    Raises:
        ValueError: for unknown names or splits, or an argument that does not apply to `name`.
        FileNotFoundError: if tfds data is not prepared and `download` is False.
    """
    if training is None:
        training = split.startswith("train")
    is_toy, is_digits = name in TOY_DATASETS, name == "digits"
    misplaced = {
        "num_levels": num_levels is not None and (is_toy or is_digits),
        "num_samples": num_samples is not None and not is_toy,
        "flip": flip and is_toy,
    }
    if any(misplaced.values()):
        given = ", ".join(k for k, v in misplaced.items() if v)
        raise ValueError(f"{given} does not apply to dataset {name!r}.")
    if is_toy:
        num_samples = TOY_NUM_SAMPLES if num_samples is None else num_samples
        ds = toy_dataset(
            name,
            batch_size=batch_size,
            num_samples=num_samples,
            seed=seed,
            split=split,
            training=training,
        )
        return ds, (2,), None
    if is_digits:
        ds = digits_dataset(split, batch_size=batch_size, seed=seed, training=training, flip=flip)
        return ds, DIGITS_SHAPE, DIGITS_NUM_LEVELS
    num_levels = 256 if num_levels is None else num_levels
    ds, info = image_dataset(
        name,
        split,
        batch_size=batch_size,
        num_levels=num_levels,
        seed=seed,
        training=training,
        flip=flip,
        data_dir=data_dir,
        download=download,
    )
    return ds, tuple(ds.element_spec.shape[1:]), num_levels


def num_examples(
    name: str, split: str = "train", *, num_samples: int | None = None, data_dir: str | None = None
) -> int | None:
    """Examples in one epoch of a split (None if tfds does not know, e.g. under `mock_data`).

    Args:
        name: as for `load_dataset`.
        split: as for `load_dataset`.
        num_samples: points per toy split, as for `load_dataset`.
        data_dir: tfds data directory.

    Returns:
        The number of examples, or None.
    """
    if name in TOY_DATASETS:
        return TOY_NUM_SAMPLES if num_samples is None else num_samples
    if name == "digits":
        total = len(load_digits().images)
        return DIGITS_NUM_TRAIN if split == "train" else total - DIGITS_NUM_TRAIN
    try:
        count = tfds.builder(name, data_dir=data_dir).info.splits[split].num_examples
    except (KeyError, ValueError, tfds.core.registered.DatasetNotFoundError):
        return None
    return int(count) or None
