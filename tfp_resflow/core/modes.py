"""Per-call modes of the package's bijectors, read at call (or trace) time.

    training_mode(training)     which log-det estimator every residual block uses
    data_dependent_init(bool)   whether ActNorm may initialise from the data it sees

Both are context managers over thread-local stacks, so threads do not see each other's modes;
under `tf.function` they are read when the function is traced.
"""

import contextlib
import threading
from collections.abc import Iterator

__all__ = [
    "data_dependent_init",
    "data_dependent_init_enabled",
    "is_training",
    "training_mode",
]


_MODES = threading.local()


def _mode(name: str, *, default: bool) -> bool:
    stack = getattr(_MODES, name, None)
    return stack[-1] if stack else default


@contextlib.contextmanager
def _push_mode(name: str, *, value: bool) -> Iterator[None]:
    stack = getattr(_MODES, name, None)
    if stack is None:
        stack = []
        setattr(_MODES, name, stack)
    stack.append(bool(value))
    try:
        yield
    finally:
        stack.pop()


def training_mode(training: bool) -> contextlib.AbstractContextManager:  # noqa: FBT001 (a mode)
    """Context manager selecting the log-det estimator of every residual block called inside.

    `training=True` (also the default outside any context) selects each block's training
    estimator, `training=False` its evaluation estimator. Under `tf.function` the mode is read
    at trace time, so trace training and evaluation in separate functions (as Keras does).

    Example:
        with tfp_resflow.training_mode(False):
            log_p = distribution.log_prob(x)   # evaluation-mode log-dets
    """
    return _push_mode("training", value=training)


def is_training() -> bool:
    """Whether residual blocks currently use their training estimator (default True)."""
    return _mode("training", default=True)


def data_dependent_init(enabled: bool) -> contextlib.AbstractContextManager:  # noqa: FBT001 (a mode)
    """Context manager enabling (default) or suppressing data-dependent initialisation.

    `FlowModel.build` traces the flow on dummy zeros inside `data_dependent_init(False)`, so
    that `ActNorm` initialises from the first real batch instead.
    """
    return _push_mode("data_init", value=enabled)


def data_dependent_init_enabled() -> bool:
    """Whether layers with data-dependent initialisation may initialise now."""
    return _mode("data_init", default=True)
