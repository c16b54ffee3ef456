"""The joint inverse-and-log-det of any bijector: one pass where the bijector allows it.

`inverse_and_log_det(bijector, y)` returns `bijector.inverse(y)` and
`bijector.inverse_log_det_jacobian(y)` in one pass for this package's bijectors (each residual
block evaluates `g` once) and for `tfb.Chain`s of them, and falls back to the two calls for any
other TFP bijector.
"""

from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.fresh_bijector import FreshBijector
from tfp_resflow.core import stateless_random
from tfp_resflow.core.context import CHAIN_TYPES

tfb = tfp.bijectors

__all__ = ["inverse_and_log_det"]


def _takes_seed(bijector: tfb.Bijector) -> bool:
    """Whether a chain member gets a seed folded from the chain's: this package's, chains."""
    return isinstance(bijector, (FreshBijector, *CHAIN_TYPES))


def inverse_and_log_det(
    bijector: tfb.Bijector,
    y: tf.Tensor,
    *,
    event_ndims: int | None = None,
    seed: Any = None,
    **kwargs: Any,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(bijector.inverse(y), bijector.inverse_log_det_jacobian(y, event_ndims))`, jointly.

    This package's bijectors compute both in one pass (`FreshBijector.inverse_and_log_det`);
    a `tfb.Chain` is walked bijector by bijector, so residual flows inside it keep their joint
    pass (like `tfb.Chain`, members take keyword arguments by name, e.g.
    `**{flow.name: {"seed": s}}`; without one, the i-th member that is this package's or a
    chain gets `fold_in(seed, i)`); any other bijector (`tfb.Shift`, `tfb.Invert`, ...) is
    called twice. Values equal those of the two calls for the same seeds.

    Args:
        bijector: any TFP bijector.
        y: data-side tensor.
        event_ndims: rank of the events; default `bijector.inverse_min_event_ndims`.
        seed: seed of stochastic log-dets; None for fresh randomness.
        **kwargs: passed on (as TFP's `**kwargs`).

    Returns:
        `(x, ildj)`.
    """
    if event_ndims is None:
        event_ndims = bijector.inverse_min_event_ndims
    if isinstance(bijector, FreshBijector):
        return bijector.inverse_and_log_det(y, event_ndims=event_ndims, seed=seed, **kwargs)
    if isinstance(bijector, CHAIN_TYPES):
        seed = None if seed is None else stateless_random.sanitize_seed(seed)
        total = None
        # Chain's forward applies its list last to first, so its inverse goes first to last.
        for i, member in enumerate(bijector.bijectors):
            member_kwargs = dict(kwargs.get(member.name, {}))  # Chain's per-name kwargs
            member_seed = member_kwargs.pop("seed", None)
            if member_seed is None and seed is not None and _takes_seed(member):
                member_seed = stateless_random.fold_in(seed, i)
            y, log_det = inverse_and_log_det(
                member, y, event_ndims=event_ndims, seed=member_seed, **member_kwargs
            )
            event_ndims = member.inverse_event_ndims(event_ndims)
            total = log_det if total is None else total + log_det
        if total is None:  # an empty chain is the identity
            total = tf.zeros([], y.dtype)
        return y, total
    if seed is not None:
        kwargs["seed"] = seed
    return (
        bijector.inverse(y, **kwargs),
        bijector.inverse_log_det_jacobian(y, event_ndims=event_ndims, **kwargs),
    )
