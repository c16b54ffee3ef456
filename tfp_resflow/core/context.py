"""The context `c` of a conditional flow `p(x | c)`: checking it, and routing it to bijectors.

A conditional bijector of this package takes `conditional_input=c` in every method, as TFP's
conditional bijectors (`tfb.MaskedAutoregressiveFlow`, `tfb.RealNVP`) do. `c` has shape
`[..., K]`: one context per example (`[*batch, K]`) or one broadcast to all (`[K]`, or any shape
that broadcasts to the batch shape). Inside a bijector every pass works on a flat batch, so the
context is broadcast and flattened the same way as the events (`flatten_context`).

`conditional_kwargs(bijector, c)` writes the keyword arguments that bring `c` to every
conditional member of a bijector, through `tfb.Chain`'s per-name kwargs and `tfb.Invert`, so a
`tfd.TransformedDistribution` of any chain can be called with
`bijector_kwargs=conditional_kwargs(flow, c)`.
"""

from typing import Any

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.bijectors import chain as tfp_chain
from tensorflow_probability.python.bijectors import invert as tfp_invert

tfb = tfp.bijectors

__all__ = [
    "CHAIN_TYPES",
    "INVERT_TYPES",
    "check_context_size",
    "conditional_kwargs",
    "context_sizes",
    "flatten_context",
    "is_conditional",
]

# TFP's own bijectors that pass `conditional_input` on to their networks.
_TFP_CONDITIONAL = (tfb.MaskedAutoregressiveFlow, tfb.RealNVP)
# `tfb.Chain(...)` and `tfb.Invert(...)` return instances of their private bases unless every
# member is a composite tensor, so isinstance checks need those bases.
CHAIN_TYPES = (tfp_chain._Chain,)  # noqa: SLF001
INVERT_TYPES = (tfp_invert._Invert,)  # noqa: SLF001


def check_context_size(name: str, value: object) -> int | None:
    """`None` (unconditional) or a positive integer K, the size of the context vector."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be None or an integer >= 1; got {value!r}.")
    return int(value)


def flatten_context(
    context: Any,
    batch_shape: tf.Tensor,
    context_size: int | None,
    *,
    owner: str,
    dtype: tf.DType,
) -> tf.Tensor | None:
    """The context broadcast to `batch_shape + [K]` and flattened to `[N, K]`.

    `N = prod(batch_shape)`, the flat batch the bijector's passes see (its examples in the same
    order as the flattened events).

    Args:
        context: the `conditional_input` given to the bijector, or None.
        batch_shape: int32 vector, the batch shape of the events.
        context_size: K, or None for an unconditional bijector.
        owner: the bijector's name, for messages.
        dtype: the events' dtype; the context is cast to it.

    Returns:
        `[N, K]`, or None for an unconditional bijector without a context.

    Raises:
        ValueError: a conditional bijector without a context, an unconditional one with a
            context, a context whose last axis is not K or whose batch shape cannot broadcast to
            the events' (when the shapes are known; at run time `InvalidArgumentError`).
    """
    if context_size is None:
        if context is not None:
            raise ValueError(
                f"{owner} is unconditional (context_size=None) and takes no conditional_input; "
                "build it with context_size=K to model p(x | c)."
            )
        return None
    if context is None:
        raise ValueError(
            f"{owner} is conditional: pass conditional_input=c of shape [batch, {context_size}] "
            f"(one context per example) or [{context_size}] (one for all)."
        )
    context = tf.convert_to_tensor(context, name="conditional_input")
    if not (context.dtype.is_floating or context.dtype.is_integer or context.dtype.is_bool):
        raise ValueError(f"{owner}: conditional_input must be numeric; got {context.dtype.name}.")
    context = tf.cast(context, dtype)
    shape = context.shape
    if shape.rank == 0 or (shape.rank is not None and shape[-1] not in (None, context_size)):
        raise ValueError(
            f"{owner}: conditional_input must have shape [..., {context_size}] (batch shape, "
            f"then the context of size {context_size}); got shape {shape}."
        )
    static_batch = tf.get_static_value(batch_shape)
    if static_batch is not None:
        static_batch = [int(n) for n in static_batch]
    if static_batch is not None and shape.rank is not None:
        try:
            tf.broadcast_static_shape(tf.TensorShape(static_batch), shape[:-1])
        except ValueError:
            raise ValueError(
                f"{owner}: conditional_input of shape {shape} does not broadcast to the batch "
                f"shape {static_batch} of the events; expected shape "
                f"[{', '.join(str(n) for n in static_batch)}, {context_size}] or "
                f"[{context_size}]."
            ) from None
    full = tf.broadcast_to(context, tf.concat([batch_shape, [context_size]], axis=0))
    return tf.reshape(full, [-1, context_size])


def is_conditional(bijector: tfb.Bijector) -> bool:
    """Whether `bijector` itself takes `conditional_input` (not through members)."""
    if isinstance(bijector, _TFP_CONDITIONAL):
        return True
    return getattr(bijector, "context_size", None) is not None


def conditional_kwargs(bijector: tfb.Bijector, context: Any) -> dict:
    """Keyword arguments that give `context` to every conditional member of `bijector`.

    This package's bijectors built with a `context_size`, and TFP's `MaskedAutoregressiveFlow`
    and `RealNVP` (whose networks must then take `conditional_input`), get
    `{"conditional_input": context}`; a `tfb.Chain` gets its members' kwargs by name (TFP's
    convention, so member names must differ) and a `tfb.Invert` its inner bijector's.

    Example:
        kwargs = conditional_kwargs(flow, c)
        distribution.log_prob(x, bijector_kwargs=kwargs)
        distribution.sample(n, bijector_kwargs=kwargs)
    """
    if is_conditional(bijector):
        return {"conditional_input": context}
    if isinstance(bijector, CHAIN_TYPES):
        routed = {}
        for member in bijector.bijectors:
            member_kwargs = conditional_kwargs(member, context)
            if member_kwargs:
                routed[member.name] = member_kwargs
        return routed
    if isinstance(bijector, INVERT_TYPES):
        return conditional_kwargs(bijector.bijector, context)
    return {}


def context_sizes(bijector: tfb.Bijector) -> list[int | None]:
    """The `context_size` of every conditional member (None for TFP's, which do not say)."""
    kwargs = conditional_kwargs(bijector, None)
    found: list[int | None] = []

    def walk(b: tfb.Bijector, routed: dict) -> None:
        if isinstance(b, CHAIN_TYPES):
            for member in b.bijectors:
                if member.name in routed:
                    walk(member, routed[member.name])
        elif isinstance(b, INVERT_TYPES):
            walk(b.bijector, routed)
        elif "conditional_input" in routed:
            found.append(getattr(b, "context_size", None))

    walk(bijector, kwargs)
    return found
