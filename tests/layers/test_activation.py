"""Tests of tfp_resflow.layers.activation: Lipschitz constants measured on dense grids."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.layers.activation import (
    ACTIVATIONS,
    CLIPSWISH_SCALE,
    LIPSWISH_SCALE,
    CLipSwish,
    LipSwish,
    get_activation,
    width_factor,
)

# Grid spacing 1e-3 on [-100, 100]: it contains the peak of |phi'| (at x = 2.3994 / beta,
# i.e. within 24 for beta >= 0.1), and phi'' is bounded, so the grid misses the true maximum
# by less than about 1e-6.
GRID = tf.constant(np.linspace(-100.0, 100.0, 200_001), tf.float64)


def derivative_norms(layer, x=GRID):
    """|phi'(x)| for elementwise layers; the l2 norm of d phi(x) / dx for CLipSwish."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x[:, None])
        columns = tf.unstack(y, axis=-1)  # inside the tape, so each is differentiable
    jac = [tape.gradient(column, x) for column in columns]
    return np.sqrt(sum(g.numpy() ** 2 for g in jac))


@pytest.mark.parametrize("beta", [0.1, 0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("cls", [LipSwish, CLipSwish])
def test_lipswish_derivative_at_most_one(cls, beta):
    layer = cls(beta, dtype="float64")
    assert float(layer.beta) == pytest.approx(beta, rel=1e-12)
    peak = derivative_norms(layer).max()
    assert peak <= 1.0
    assert peak >= 0.9998  # 0.99985 and 0.99997: the scales are tight, not just safe


def test_lipswish_scale_is_the_peak_of_the_swish_derivative():
    x = tf.constant(np.linspace(0.0, 10.0, 100_001), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x * tf.sigmoid(x)
    peak = tape.gradient(y, x).numpy().max()
    assert peak == pytest.approx(1.099839, abs=1e-6)
    assert peak < LIPSWISH_SCALE < peak + 1e-3
    both = np.sqrt(peak**2 + (1 - peak) ** 2) / LIPSWISH_SCALE  # see CLIPSWISH_SCALE's comment
    assert both < CLIPSWISH_SCALE < both + 1e-4


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_is_one_lipschitz(name):
    layer = get_activation(name, dtype="float64")
    assert derivative_norms(layer).max() <= 1.0 + 1e-12


def test_beta_is_softplus_of_a_trainable_b():
    layer = LipSwish()
    x = tf.constant([[-1.0, 0.5, 3.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    assert float(layer.b) == pytest.approx(0.5)  # the authors' initial value
    assert float(layer.beta) == pytest.approx(math.log1p(math.e**0.5))
    assert [v.name for v in layer.trainable_weights] == ["b"]
    assert abs(float(tape.gradient(loss, layer.b))) > 1e-3
    frozen = LipSwish(trainable_beta=False)
    frozen.build((None, 3))
    assert frozen.trainable_weights == []


def test_lipswish_values():
    beta = 2.0
    layer = LipSwish(beta, dtype="float64")
    x = np.array([-3.0, -0.5, 0.0, 0.7, 4.0])
    expected = x / (1 + np.exp(-beta * x)) / 1.1
    np.testing.assert_allclose(layer(x[None]).numpy()[0], expected, rtol=1e-14)
    clip = CLipSwish(beta, dtype="float64")
    out = clip(x[None]).numpy()[0]
    np.testing.assert_allclose(out[:5], expected / CLIPSWISH_SCALE, rtol=1e-14)
    np.testing.assert_allclose(out[5:], (-x / (1 + np.exp(beta * x)) / 1.1) / 1.004, rtol=1e-14)
    assert clip.compute_output_shape((None, 5)) == (None, 10)


@pytest.mark.parametrize("cls", [LipSwish, CLipSwish])
def test_stable_at_extremes_in_float32(cls):
    layer = cls(10.0)
    x = tf.constant([[-50.0, -1e4, 50.0, 1e4]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    grad = tape.gradient(y, x)
    assert np.all(np.isfinite(y.numpy()))
    assert np.all(np.isfinite(grad.numpy()))


def test_new_layer_per_call_and_config_round_trip():
    a, b = get_activation("LipSwish"), get_activation("lipswish")
    assert a is not b
    layer = CLipSwish(0.3, trainable_beta=False, name="act")
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is CLipSwish
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: get_activation("relu6"), "got 'relu6'"),
        (lambda: get_activation(None), "got None"),
        (lambda: LipSwish(0.0), "initial_beta must be a number > 0; got 0.0"),
        (lambda: LipSwish(-1), "got -1"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_width_factor_is_the_layers_outputs_per_input(name):
    layer = get_activation(name)
    assert width_factor(name) * 3 == layer.compute_output_shape((None, 3))[-1]
    assert width_factor(name.upper()) == width_factor(name)


def test_width_factor_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="activation"):
        width_factor("relu6")
