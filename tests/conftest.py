"""Shared pytest setup: quiet TensorFlow logs, the order test files are handed to workers."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# setup.cfg runs the suite on two pytest-xdist workers, each test file on one worker
# (`--dist loadfile`, so a module's fixtures, such as the benchmarks' shared quick run, are
# built once) and files handed out in collection order. The files that run whole trainings go
# first, so the many short files fill in behind them instead of one worker finishing a long
# file alone at the end.
LONG_FILES = ("test_benchmarks.py", "test_train_tf.py", "test_notebooks.py", "test_docs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: otherwise unchanged
