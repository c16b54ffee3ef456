"""Tests of the per-call modes (`tfp_resflow.core.modes`): defaults, nesting, threads."""

import threading

import pytest

from tfp_resflow.core import modes


@pytest.mark.parametrize(
    ("context", "read"),
    [
        (modes.training_mode, modes.is_training),
        (modes.data_dependent_init, modes.data_dependent_init_enabled),
    ],
)
def test_modes_nest_and_restore(context, read):
    assert read() is True  # the default
    with context(False):
        assert read() is False
        with context(True):
            assert read() is True
        assert read() is False
    assert read() is True
    with pytest.raises(RuntimeError), context(False):
        raise RuntimeError  # restored on errors too
    assert read() is True


def test_modes_are_per_thread():
    seen = []
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        with modes.training_mode(False):
            inside.set()
            release.wait(5)
            seen.append(modes.is_training())

    thread = threading.Thread(target=other_thread)
    thread.start()
    inside.wait(5)
    assert modes.is_training() is True  # the other thread's mode does not leak here
    release.set()
    thread.join()
    assert seen == [False]
