"""One pass per block inside `tfd.TransformedDistribution.log_prob`.

TFP computes `TransformedDistribution(base, b).log_prob(y)` (TFP 0.25,
`TransformedDistribution.experimental_local_measure`) as

    x = b.inverse(y)
    log_prob = base.log_prob(x) - b.forward_log_det_jacobian(x)   # the "density correction"

and `forward_log_det_jacobian(x)` falls back to `-inverse_log_det_jacobian(forward(x))`. For a
residual block that is a second evaluation of `g` (the log-det estimator's `g(y)`), and in eager
mode a fixed-point solve for `forward(x)` as well: four evaluations of `g` instead of one.

`SharedDensityPass` removes them. When a bijector's `inverse` runs *inside* a
`TransformedDistribution`'s density computation (`density_correction_follows`), it takes its
joint pass (`_inverse_and_log_det`: the value and the log-det from one evaluation of `g`) and
keeps `(y, x, log-det)` in a `JointPassRecord`. The density correction that follows finds it by
the identity of `x` and answers `forward(x) = y` and `forward_log_det_jacobian(x) = -log-det`
without evaluating anything. The values are those of the two calls for the same seed.

A record is valid only while the `TransformedDistribution` call that made it is still running
(its frame is on the stack): no later call, and so no call after a weight update, can see it.
`inverse` outside such a call computes the value alone, as before, so a user who only wants
latents pays nothing for a log-det.

This relies on two facts of TFP's implementation, checked on TFP 0.25 by
`tests/bijectors/test_density_pass.py` (which fails if an upgrade changes them): the density is
computed in `TransformedDistribution.experimental_local_measure`, and that method calls
`bijector.inverse(y)` before the density correction on the same `x`.
"""

import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import tensorflow as tf
from tensorflow_probability.python.distributions import transformed_distribution

__all__ = ["JointPassRecord", "SharedDensityPass", "density_correction_follows"]

# The TFP method that computes a transformed density: `log_prob`, `prob` and
# `experimental_local_measure` of every `TransformedDistribution` go through it.
_LOCAL_MEASURE_CODE = (
    transformed_distribution._TransformedDistribution.experimental_local_measure.__code__  # noqa: SLF001
)
_MAX_RECORDS = 8  # per bijector and thread: a bijector used several times in one chain


def _frames() -> Iterator[FrameType]:
    frame = sys._getframe(1)  # noqa: SLF001
    while frame is not None:
        yield frame
        frame = frame.f_back


def density_correction_follows() -> FrameType | None:
    """The innermost running `TransformedDistribution` density computation's frame, or None.

    Inside it, `bijector.inverse(y)` is followed by the density correction at its output.
    """
    for frame in _frames():
        if frame.f_code is _LOCAL_MEASURE_CODE:
            return frame
    return None


def _is_running(frame: FrameType) -> bool:
    return any(f is frame for f in _frames())


def _same_kwargs(a: dict, b: dict) -> bool:
    """Whether two calls got the same keyword arguments (the same objects; None = absent)."""
    a = {k: v for k, v in a.items() if v is not None}
    b = {k: v for k, v in b.items() if v is not None}
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


@dataclass(frozen=True, eq=False)  # compared by identity: the fields hold tensors
class JointPassRecord:
    """One joint pass `x, log_det = inverse_and_log_det(y)`, valid while `frame` runs."""

    y: tf.Tensor
    x: weakref.ReferenceType
    log_det: tf.Tensor
    kwargs: dict
    frame: FrameType

    def matches(self, x: tf.Tensor, kwargs: dict) -> bool:
        return self.x() is x and _same_kwargs(self.kwargs, kwargs)


class SharedDensityPass:
    """Mixin for bijectors whose `_inverse_and_log_det` shares work between value and log-det.

    Subclasses call `_inverse_for_density` at the start of `_inverse` and `_recorded_forward`
    at the start of `_forward`; the mixin supplies `_forward_log_det_jacobian`.
    """

    _inverse_log_det_jacobian: Any
    _inverse_and_log_det: Any
    forward: Any

    def _records(self) -> list[JointPassRecord]:
        """This thread's records (replicas of a `tf.distribute` strategy trace in threads)."""
        # Set through __dict__: tf.Module's attribute tracking has no business with it.
        local = self.__dict__.setdefault("_joint_pass_records", threading.local())
        if not hasattr(local, "records"):
            local.records = []
        return local.records

    def _inverse_for_density(self, y: tf.Tensor, **kwargs: Any) -> tf.Tensor | None:
        """Inside a density computation: `inverse(y)` by the joint pass, its log-det kept.

        Returns None elsewhere (the caller computes the value alone).
        """
        frame = density_correction_follows()
        if frame is None:
            return None
        x, log_det = self._inverse_and_log_det(y, **kwargs)
        records = self._records()
        records[:] = [r for r in records if r.x() is not None and _is_running(r.frame)]
        records.append(JointPassRecord(y, weakref.ref(x), log_det, dict(kwargs), frame))
        del records[:-_MAX_RECORDS]
        return x

    def _recorded(self, x: tf.Tensor, kwargs: dict) -> JointPassRecord | None:
        for record in reversed(self._records()):
            if record.matches(x, kwargs) and _is_running(record.frame):
                return record
        return None

    def _recorded_forward(self, x: tf.Tensor, **kwargs: Any) -> tf.Tensor | None:
        """`forward(x)` when `x` is a recorded inverse's output: its input, exactly."""
        record = self._recorded(x, kwargs)
        return None if record is None else record.y

    def _forward_log_det_jacobian(self, x: tf.Tensor, **kwargs: Any) -> tf.Tensor:
        """`-log-det` of the joint pass that returned `x`, else `-ildj(forward(x))` as TFP.

        The density correction asks for the log-det last (after any `forward(x)` of a chain's
        walk), so the record is dropped here: nothing outlives the call that needed it.
        """
        record = self._recorded(x, kwargs)
        if record is not None:
            records = self._records()
            records[:] = [r for r in records if r is not record]
            return -record.log_det
        return -self._inverse_log_det_jacobian(self.forward(x, **kwargs), **kwargs)
