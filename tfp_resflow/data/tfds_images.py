"""Any 8-bit tensorflow-datasets image set as a `tf.data` pipeline, offline unless asked.

The conventions (dequantisation, seeding, training streams and evaluation passes) are those of
`tfp_resflow.data.datasets`, whose `load_dataset` is the usual entry point.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfp_resflow.core import validation
from tfp_resflow.data.dequantization import check_num_levels, image_pipeline

__all__ = ["image_dataset", "num_classes"]

SHUFFLE_BUFFER = 10_000  # tfds examples are already shuffled on disk when prepared.


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
    labels: bool = False,
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
        labels: batches of `(images, labels)` from the set's "label" feature.

    Returns:
        A dataset of float32 batches `[batch_size, H, W, C]` in [0, 1) (with int32 labels
        `[batch_size]` if `labels`), and the tfds `DatasetInfo`.

    Raises:
        ValueError: for an unknown dataset (tfds' `DatasetNotFoundError`) or bad arguments.
        FileNotFoundError: if the data is not prepared and `download` is False.
    """
    batch_size = validation.positive_integer("batch_size", batch_size)
    num_levels = check_num_levels(num_levels, 256)
    builder = tfds.builder(name, data_dir=data_dir)
    key = _image_key(name, builder.info.features)
    if labels:
        num_classes(name, data_dir=data_dir)  # checks there is a label feature
    examples = _examples(builder, name, split, download=download)
    images = examples.map(lambda example: example[key], num_parallel_calls=tf.data.AUTOTUNE)
    targets = examples.map(lambda example: example["label"]) if labels else None
    ds = image_pipeline(
        images,
        labels=targets,
        source_levels=256,
        num_levels=num_levels,
        batch_size=batch_size,
        seed=seed,
        training=training,
        flip=flip,
        shuffle_buffer=SHUFFLE_BUFFER,
    )
    return ds, builder.info


def _examples(
    builder: tfds.core.DatasetBuilder, name: str, split: str, *, download: bool
) -> tf.data.Dataset:
    """The split's examples in file order; prepared first only if `download`."""
    if download:
        builder.download_and_prepare()
    try:
        return builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # tfds' "could not find data" error
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Nothing is downloaded "
            "by default: pass download=True (needs internet), run `tfds build`, or point "
            "data_dir / TFDS_DATA_DIR at a folder holding the prepared data."
        ) from e


def num_classes(name: str, *, data_dir: str | None = None) -> int:
    """The number of classes of a tfds set's "label" feature.

    Raises:
        ValueError: if the set has no class label named "label".
    """
    features = tfds.builder(name, data_dir=data_dir).info.features
    feature = features["label"] if "label" in features.keys() else None
    if not isinstance(feature, tfds.features.ClassLabel):
        raise ValueError(f"tfds dataset {name!r} has no class label named 'label'.")
    return int(feature.num_classes)
