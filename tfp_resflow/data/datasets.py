"""`tf.data` image pipelines (the scikit-learn 8x8 digits, any tfds image set) and `load_dataset`.

`load_dataset` is the one entry point for every data set, the 2-D toy sets of
`tfp_resflow.data.toy_data` included; the conventions below hold for all of them.

Images with k levels per dimension are uniformly dequantised and scaled to [0, 1):

    x = (n + u) / k,    n in {0, ..., k - 1},  u ~ U(0, 1)

the convention of `tfp_resflow.models.bits`. Fewer levels than the source's are made by merging
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
`download=True` is passed (see `tfp_resflow.data.tfds_images`).
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from tfp_resflow.core import validation
from tfp_resflow.data import tfds_images
from tfp_resflow.data.dequantization import check_num_levels, image_pipeline
from tfp_resflow.data.toy_data import (
    TOY_DATASETS,
    TOY_NUM_SAMPLES,
    toy_dataset,
    toy_samples,
)

__all__ = [
    "DIGITS_NUM_LEVELS",
    "DIGITS_NUM_TRAIN",
    "DIGITS_SHAPE",
    # Re-exported from `toy_data`, where they live, for code that finds them here (notebooks).
    "TOY_DATASETS",
    "TOY_NUM_SAMPLES",
    "DIGITS_NUM_CLASSES",
    "check_num_levels",
    "digits_dataset",
    "image_pipeline",
    "load_dataset",
    "num_classes",
    "num_examples",
    "toy_dataset",
    "toy_samples",
]

DIGITS_NUM_LEVELS = 17  # load_digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap).
DIGITS_SHAPE = (8, 8, 1)
DIGITS_NUM_TRAIN = 1500  # of 1797 images; the other 297 form the test split.
DIGITS_NUM_CLASSES = 10


def digits_dataset(
    split: str,
    *,
    batch_size: int,
    seed: int | None = None,
    training: bool = True,
    flip: bool = False,
    split_seed: int = 0,
    labels: bool = False,
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
        labels: batches of `(images, digit labels)` instead of images.

    Returns:
        A dataset of float32 batches of shape `[batch_size, 8, 8, 1]` in [0, 1) (with int32
        labels `[batch_size]` if `labels`).

    Raises:
        ValueError: for an unknown split or bad arguments.
    """
    validation.choice("split", split, ("train", "test"))
    batch_size = validation.positive_integer("batch_size", batch_size)
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    order = np.random.default_rng(split_seed).permutation(len(images))
    part = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    return image_pipeline(
        tf.data.Dataset.from_tensor_slices(images[part]),
        labels=tf.data.Dataset.from_tensor_slices(digits.target[part]) if labels else None,
        source_levels=DIGITS_NUM_LEVELS,
        num_levels=DIGITS_NUM_LEVELS,
        batch_size=batch_size,
        seed=seed,
        training=training,
        flip=flip,
        shuffle_buffer=len(part),
    )


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
    labels: bool = False,
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
        labels: batches of `(features, int32 labels)` (digits and labelled tfds sets; the toy
            sets have none).

    Returns:
        `(dataset, event_shape, num_levels)`: the dataset of float32 feature batches (with
        labels if `labels`), the shape of one example, and k for bits/dim (None for
        continuous toy data).

    Raises:
        ValueError: for unknown names or splits, or an argument that does not apply to `name`.
        FileNotFoundError: if tfds data is not prepared and `download` is False.
    """
    if training is None:
        training = split.startswith("train")
    _check_options_apply(name, flip=flip, num_levels=num_levels, num_samples=num_samples)
    common = {"batch_size": batch_size, "seed": seed, "training": training}
    if name in TOY_DATASETS:
        if labels:
            raise ValueError(f"the toy set {name!r} has no labels: classify digits or tfds sets.")
        num_samples = TOY_NUM_SAMPLES if num_samples is None else num_samples
        return toy_dataset(name, num_samples=num_samples, split=split, **common), (2,), None
    if name == "digits":
        ds = digits_dataset(split, flip=flip, labels=labels, **common)
        return ds, DIGITS_SHAPE, DIGITS_NUM_LEVELS
    num_levels = 256 if num_levels is None else num_levels
    ds, _ = tfds_images.image_dataset(
        name,
        split,
        num_levels=num_levels,
        flip=flip,
        data_dir=data_dir,
        download=download,
        labels=labels,
        **common,
    )
    spec = ds.element_spec[0] if labels else ds.element_spec
    return ds, tuple(spec.shape[1:]), num_levels


def _check_options_apply(
    name: str, *, flip: bool, num_levels: int | None, num_samples: int | None
) -> None:
    """Raises if an option of `load_dataset` is given for a dataset it does not apply to."""
    is_toy, is_digits = name in TOY_DATASETS, name == "digits"
    misplaced = {
        "num_levels": num_levels is not None and (is_toy or is_digits),
        "num_samples": num_samples is not None and not is_toy,
        "flip": flip and is_toy,
    }
    if any(misplaced.values()):
        given = ", ".join(k for k, v in misplaced.items() if v)
        raise ValueError(f"{given} does not apply to dataset {name!r}.")


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


def num_classes(name: str, *, data_dir: str | None = None) -> int:
    """Classes of a labelled data set: 10 for the digits, tfds' count for a tfds set.

    Raises:
        ValueError: for a toy set (no labels) or a tfds set without a "label" feature.
    """
    if name in TOY_DATASETS:
        raise ValueError(f"the toy set {name!r} has no labels: classify digits or tfds sets.")
    if name == "digits":
        return DIGITS_NUM_CLASSES
    return tfds_images.num_classes(name, data_dir=data_dir)
