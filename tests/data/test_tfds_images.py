"""Tests of tfds image pipelines (`tfp_resflow.data.tfds_images`) with `tfds.testing.mock_data`."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_checks import assert_dequantized, epoch, levels, mirrored_count, stream

from tfp_resflow.data import datasets, tfds_images


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
@pytest.mark.parametrize("num_levels", [256, 32])
def test_tfds_images(tmp_path, name, shape, num_levels):
    with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
        ds, event_shape, k = datasets.load_dataset(
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
        train, info = tfds_images.image_dataset(
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
        tfds_images.image_dataset("mnist", "train", batch_size=4, data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_tfds_labels(tmp_path):
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        ds, shape, _ = datasets.load_dataset(
            "mnist", "test", batch_size=5, data_dir=str(tmp_path), labels=True
        )
        images, labels = (
            np.concatenate(part) for part in zip(*[(x, y) for x, y in ds], strict=True)
        )
        raw = [
            ex["label"]
            for ex in tfds.as_numpy(tfds.load("mnist", split="test", data_dir=str(tmp_path)))
        ]
        assert tfds_images.num_classes("mnist", data_dir=str(tmp_path)) == 10
    assert shape == (28, 28, 1)
    assert images.shape == (12, 28, 28, 1)
    np.testing.assert_array_equal(labels, raw)  # evaluation order is file order


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: tfds_images.image_dataset("mnist", "train", batch_size=2, num_levels=257),
            "got 257",
        ),
        (lambda: tfds_images.image_dataset("mnist", "train", batch_size=2, num_levels=1), "got 1"),
        (lambda: tfds_images.image_dataset("no_such_set", "train", batch_size=2), "no_such_set"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
