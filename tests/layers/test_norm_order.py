"""Tests of tfp_resflow.layers.norm_order: the order map, its inverse and the NormOrder layer."""

import json
import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.layers.norm_order import NormOrder, logit_of_order, order_of_logit


def test_map_starts_at_two_is_increasing_and_stays_in_one_to_five():
    t = tf.constant(np.linspace(-8.0, 12.0, 2001))  # beyond, float64 rounds p to 1 or 5
    p = order_of_logit(t).numpy()
    assert float(order_of_logit(tf.constant(0.0, tf.float64))) == pytest.approx(2.0, abs=1e-12)
    assert np.all(np.diff(p) > 0)
    assert p.min() > 1.0
    assert p.max() < 5.0
    assert p[0] < 1.0 + 1e-6
    assert p[-1] > 5.0 - 1e-2
    # The authors' asymmetry: p saturates fast towards 1 (tanh of a linear function) and
    # slowly towards 5 (the leaky ELU's flat part): at t = -4 and t = +4, 4e-4 and 0.13 away.
    near_one, near_five = order_of_logit(tf.constant([-4.0, 4.0], tf.float64)).numpy()
    assert 5.0 - near_five > 100 * (near_one - 1.0)


@pytest.mark.parametrize("order", [1.001, 1.3, 2.0, 2.7, 3.0, 4.5, 4.999])
def test_logit_of_order_inverts_the_map(order):
    t = logit_of_order(order)
    assert float(order_of_logit(tf.constant(t, tf.float64))) == pytest.approx(order, rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("initial_order", [1.5, 2.0, 3.5])
def test_layer_starts_at_its_order_and_round_trips(dtype, initial_order):
    order = NormOrder(initial_order, dtype=dtype)
    assert [w.path for w in order.trainable_weights] == [f"{order.name}/logit"]
    assert order.logit.dtype == dtype
    assert float(order.order()) == pytest.approx(initial_order, rel=1e-6)
    assert float(order()) == float(order.order())
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(order)))
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, NormOrder)
    assert clone is not order
    assert clone.get_config() == order.get_config()
    assert float(clone.order()) == pytest.approx(initial_order, rel=1e-6)


def test_order_is_differentiable_in_the_logit():
    order = NormOrder(2.5, dtype="float64")  # away from 3, where the ELU switches branch
    with tf.GradientTape() as tape:
        p = order.order()
    grad = float(tape.gradient(p, order.logit))
    t, h = float(order.logit), 1e-6
    numeric = (
        float(order_of_logit(tf.constant(t + h, tf.float64)))
        - float(order_of_logit(tf.constant(t - h, tf.float64)))
    ) / (2 * h)
    assert grad == pytest.approx(numeric, rel=1e-7)
    assert grad > 0


@pytest.mark.parametrize("bad", [1, 1.0, 5, 0.5, 7.0, math.nan, math.inf, "two", True, None])
def test_orders_outside_the_open_range_raise(bad):
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
        NormOrder(bad)
