"""The context of conditional flows: checks, broadcasting, routing (`tfp_resflow.core.context`)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.core.context import (
    check_context_size,
    conditional_kwargs,
    context_sizes,
    flatten_context,
    is_conditional,
)

tfb = tfp.bijectors


def flat(context, batch_shape, size=2):
    return flatten_context(
        context, tf.constant(batch_shape, tf.int32), size, owner="flow", dtype=tf.float64
    )


@pytest.mark.parametrize(
    ("context_shape", "batch_shape"),
    [((2,), (4,)), ((4, 2), (4,)), ((1, 2), (4,)), ((3, 1, 2), (3, 4)), ((2,), (3, 4))],
)
def test_contexts_broadcast_to_the_batch_and_flatten_in_its_order(context_shape, batch_shape):
    rng = np.random.default_rng(0)
    context = rng.normal(size=context_shape)
    result = flat(context, batch_shape)
    expected = np.broadcast_to(context, (*batch_shape, 2)).reshape(-1, 2)
    assert result.dtype == tf.float64
    np.testing.assert_array_equal(result, expected)


def test_integer_contexts_are_cast_to_the_events_dtype():
    result = flat(np.array([[0, 1], [1, 0]], np.int32), (2,))
    assert result.dtype == tf.float64
    np.testing.assert_array_equal(result, [[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    ("context", "size", "message"),
    [
        (None, 2, r"is conditional: pass conditional_input=c of shape \[batch, 2\]"),
        (np.zeros((4, 2)), None, "is unconditional"),
        (np.zeros((4, 3)), 2, r"must have shape \[\.\.\., 2\].*got shape \(4, 3\)"),
        (np.float64(1.0), 2, r"must have shape \[\.\.\., 2\]"),
        (np.zeros((5, 2)), 2, r"does not broadcast to the batch shape \[4\].*\[4, 2\] or \[2\]"),
        (np.array([["a", "b"]]), 2, "must be numeric"),
    ],
)
def test_bad_contexts_name_the_expected_shape(context, size, message):
    with pytest.raises(ValueError, match=message):
        flat(context, (4,), size)


def test_unknown_batch_sizes_are_checked_at_run_time():
    fn = tf.function(
        lambda c, n: flatten_context(c, tf.stack([n]), 2, owner="flow", dtype=tf.float32),
        input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([], tf.int32)],
    )
    assert fn(tf.zeros([3, 2]), 3).shape == (3, 2)
    assert fn(tf.zeros([1, 2]), 3).shape == (3, 2)
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn(tf.zeros([2, 2]), 3)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_context_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="context_size must be None or an integer >= 1"):
        check_context_size("context_size", value)


def test_conditional_kwargs_reach_every_conditional_member_by_name():
    conditional = ResidualFlowBijector(context_size=2, name="conditional_flow")
    plain = ResidualFlowBijector(name="plain_flow")
    shift = tfb.Shift(1.0)
    c = tf.zeros([2])
    assert is_conditional(conditional)
    assert not is_conditional(plain)
    assert conditional_kwargs(conditional, c) == {"conditional_input": c}
    assert conditional_kwargs(plain, c) == {}
    chain = tfb.Chain([shift, tfb.Invert(conditional), plain])
    routed = conditional_kwargs(chain, c)
    assert routed == {"invert_conditional_flow": {"conditional_input": c}}
    assert conditional_kwargs(tfb.Invert(chain), c) == routed
    assert context_sizes(chain) == [2]
    assert context_sizes(plain) == []
