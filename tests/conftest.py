"""Shared pytest setup: quiet TensorFlow logs and a `slow` marker (CI runs every test)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
