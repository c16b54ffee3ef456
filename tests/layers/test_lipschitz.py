"""Tests of lipschitz and spectral_conv: the layers' rescaling, updates and config.

The norms themselves are checked against ground truth in tests/layers/test_operator_norm.py.
"""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from spectral_checks import CONVERGE, conv, dense, learnable_dense, operator_matrix

from tfp_resflow.layers.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    norm_order_loss,
    spectral_layers,
    update_lipschitz,
)
from tfp_resflow.layers.norm_order import NormOrder


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: dense(6, 4, stddev=3.0, lipschitz_constant=0.7), (6,)),
        (lambda: conv((4, 4, 2), 3, 3, stddev=3.0, lipschitz_constant=0.7), (4, 4, 2)),
        (lambda: conv((4, 4, 2), 3, 3, stddev=3.0, strides=2, lipschitz_constant=0.7), (4, 4, 2)),
    ],
    ids=["dense", "conv", "conv-stride2"],
)
def test_normalized_operator_is_bounded_and_kernel_kept(make, shape):
    layer = make()
    kernel = layer.kernel.numpy().copy()
    layer(tf.ones((2, *shape), tf.float64), training=True)
    layer.update_lipschitz(**CONVERGE)
    norm = np.linalg.norm(operator_matrix(layer, shape), 2)
    c = layer.lipschitz_constant
    assert norm <= c * (1 + 1e-3)
    assert norm >= c * (1 - 1e-2)  # the raw norm is about 10x larger: the rule did bind
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_layer_inside_bound_is_unchanged():
    layer = dense(4, 3, stddev=0.05, lipschitz_constant=0.9)
    x = tf.random.stateless_normal((5, 4), seed=(1, 2), dtype=tf.float64)
    expected = x.numpy() @ layer.kernel.numpy() + layer.bias.numpy()
    np.testing.assert_array_equal(layer.effective_kernel().numpy(), layer.kernel.numpy())
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-14)


def test_power_iteration_is_warm_started_and_call_is_pure():
    layer = dense(8, 8, lipschitz_constant=0.5)
    # Close top singular values (1, 0.98, ...) make the power method slow from a cold start.
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    right, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    layer.kernel.assign(left @ np.diag(np.linspace(1.0, 0.86, 8)) @ right)

    def alignment():  # |cos| between v and the top singular vector of A = W^T
        v = layer.v.numpy()[0]
        return abs(v @ left[:, 0]) / np.linalg.norm(v)

    layer.v.assign(rng.standard_normal((1, 8)))  # forget the build-time iterations
    layer.update_lipschitz(1)
    assert alignment() < 0.99  # one step from a random start is far off...
    layer.update_lipschitz(**CONVERGE)
    layer.update_lipschitz(1)
    assert alignment() > 1 - 1e-6  # ...but stays converged from the stored estimate
    u, v = layer.u.numpy(), layer.v.numpy()
    x = tf.ones((3, 8), tf.float64)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, layer.kernel)

    grad = step(x)
    assert np.all(np.isfinite(grad.numpy()))
    assert np.any(grad.numpy() != 0)
    np.testing.assert_array_equal(layer.u.numpy(), u)
    np.testing.assert_array_equal(layer.v.numpy(), v)


@pytest.mark.parametrize(
    "make", [lambda **kw: conv((6, 6, 2), 3, 3, **kw), lambda **kw: dense(5, 4, **kw)]
)
def test_initial_power_iterations_defer_or_shorten_the_build_time_convergence(make):
    converged = make()  # default: iterates to 1e-6 when built
    deferred = make(initial_power_iterations=0)
    assert deferred.get_config()["initial_power_iterations"] == 0
    assert not np.any(deferred.u.numpy())  # never iterated: u is still its zero initial value
    # The same kernel (seeded initializer): an unconverged estimate is a strict lower bound...
    assert float(deferred.sigma()) < float(converged.sigma()) * (1 - 1e-3)
    # ...until update_lipschitz converges it.
    deferred.update_lipschitz(**CONVERGE)
    assert float(deferred.sigma()) == pytest.approx(float(converged.sigma()), rel=1e-5)
    assert np.any(make(initial_power_iterations=2).u.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_update_inside_tf_function_matches_eager(jit_compile):
    layer = conv((4, 4, 2), 3, 3, stddev=2.0)
    eager = float(layer.update_lipschitz(**CONVERGE))
    layer.v.assign(np.random.default_rng(1).standard_normal((1, 4, 4, 2)))

    @tf.function(jit_compile=jit_compile)
    def update_and_call(x):
        sigma = layer.update_lipschitz(atol=1e-7, rtol=1e-7, max_iterations=3000)
        return sigma, layer(x)

    sigma, y = update_and_call(tf.ones((2, 4, 4, 2), tf.float64))
    assert float(sigma) == pytest.approx(eager, rel=1e-6)
    assert y.shape == (2, 4, 4, 3)


def test_update_lipschitz_walks_nested_models():
    inner = keras.Sequential([keras.Input((4,)), SpectralDense(6), keras.layers.Dense(6)])
    model = keras.Sequential([keras.Input((4,)), inner, SpectralDense(3, lipschitz_constant=0.5)])
    layers = spectral_layers([model, inner])
    assert [type(layer).__name__ for layer in layers] == ["SpectralDense", "SpectralDense"]
    for layer in layers:
        layer.kernel.assign(layer.kernel * 10.0)
    sigmas = update_lipschitz(model, **CONVERGE)
    assert len(sigmas) == 2
    for layer, sigma in zip(layers, sigmas, strict=True):
        assert float(sigma) == pytest.approx(np.linalg.norm(layer.kernel.numpy(), 2), rel=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dense(3, 4, domain="inf", codomain=1, atol=1e-4, power_iterations=3),
        lambda: conv((5, 5, 2), 3, (3, 1), strides=2, padding="valid", domain=1.5),
    ],
    ids=["dense", "conv"],
)
def test_get_config_round_trips(make):
    layer = make()
    config = layer.get_config()
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    assert clone.get_config() == config
    assert clone.built  # from the serialized build config
    clone.set_weights(layer.get_weights())
    x = tf.random.stateless_normal((2, *layer.get_build_config()["input_shape"][1:]), (0, 1))
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy(), rtol=1e-12)


def _raises(fn, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn()


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda: SpectralDense(2, lipschitz_constant=0.0), "got 0.0"),
        (
            lambda: SpectralDense(2, lipschitz_constant=1),
            "lipschitz_constant must be a number in (0, 1)",
        ),
        (lambda: SpectralDense(2, lipschitz_constant=1.5), "got 1.5"),
        (lambda: SpectralDense(2, lipschitz_constant=-0.1), "got -0.1"),
        (lambda: SpectralDense(2, domain=0.5), "domain must be a number in [1, inf]"),
        (lambda: SpectralDense(2, codomain="two"), "got 'two'"),
        (lambda: SpectralConv2D(2, 3, codomain=float("nan")), "got nan"),
        (lambda: SpectralDense(2, power_iterations=0), "power_iterations"),
        (lambda: SpectralDense(2, power_iterations=-3), "got -3"),
        (lambda: SpectralDense(2, max_iterations=2.5), "max_iterations"),
        (lambda: SpectralDense(2, initial_power_iterations=-1), "initial_power_iterations"),
        (lambda: SpectralConv2D(2, 3, initial_power_iterations=1.0), "got 1.0"),
        (lambda: SpectralDense(2, atol=-1.0), "atol must be a number >= 0"),
        (lambda: SpectralDense(0), "units must be a positive integer; got 0"),
        (lambda: SpectralConv2D(2, 0), "kernel_size"),
        (lambda: SpectralConv2D(2, 3, strides=(1, 0)), "strides"),
        (lambda: SpectralConv2D(2, 3, padding="causal"), "got 'causal'"),
        (lambda: dense(3, 2).update_lipschitz(0), "power_iterations"),
        (lambda: dense(3, 2).update_lipschitz(rtol=-0.5), "got -0.5"),
        (lambda: dense(3, 2).update_lipschitz(max_iterations=-1), "got -1"),
        (lambda: dense(3, 2).update_lipschitz(5, atol=1e-3), "not both"),
        (lambda: SpectralConv2D(2, 3).build((None, None, None, 3)), "full input shape"),
        (lambda: conv((2, 2, 1), 2, 3, padding="valid"), "larger than the input"),
    ],
)
def test_bad_arguments_raise(fn, message):
    _raises(fn, message)


# Learnable orders


def test_only_the_order_objective_reaches_the_orders():
    layer, domain, codomain = learnable_dense(1.5, 3, units=4, n_in=3, stddev=3.0)
    x = tf.random.stateless_normal((5, 3), (0, 2), dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        y = tf.reduce_sum(layer(x) ** 2)
        loss = norm_order_loss([layer])
    assert tape.gradient(y, [domain.logit, codomain.logit]) == [None, None]
    assert tape.gradient(loss, layer.kernel) is None
    assert all(g is not None for g in tape.gradient(loss, [domain.logit, codomain.logit]))
    assert float(loss) == float(layer.sigma_of_orders())
    assert norm_order_loss([dense(3, 2)]) is None  # fixed orders: nothing to learn


def test_order_loss_averages_over_layers_and_a_shared_order_counts_once():
    shared = NormOrder(3.0, dtype="float64")
    first = dense(2, 3, domain=NormOrder(1.5, dtype="float64"), codomain=shared)
    second = dense(3, 2, domain=shared, codomain=shared)
    assert second.learnable_orders == [shared]
    loss = norm_order_loss([first, second, dense(2, 2)])
    expected = (float(first.sigma_of_orders()) + float(second.sigma_of_orders())) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_learnable_1x1_conv_uses_the_operator_since_orders_may_cross():
    in_shape = (4, 4, 2)
    layer = conv(in_shape, 3, 1, domain=NormOrder(3.0), codomain=NormOrder(1.5))
    assert layer.v.shape == (1, *in_shape)  # the image, not one pixel
    sigma = float(layer.update_lipschitz(**CONVERGE))
    a = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), in_shape)
    p, q = 3.0, 1.5
    matrix = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), (1, 1, 2))
    vs = np.random.default_rng(1).standard_normal((a.shape[1], 2000))
    assert sigma >= np.max(np.linalg.norm(a @ vs, q, axis=0) / np.linalg.norm(vs, p, axis=0))
    # With p > q the operator's norm exceeds the matrix's (16 pixels: by up to 16**(1/q - 1/p)).
    vm = np.random.default_rng(2).standard_normal((2, 20000))
    matrix_norm = np.max(np.linalg.norm(matrix @ vm, q, axis=0) / np.linalg.norm(vm, p, axis=0))
    assert sigma > 1.5 * matrix_norm


def test_learnable_get_config_round_trips():
    layer, domain, _ = learnable_dense(1.5, 3, units=4, n_in=3)
    domain.logit.assign(0.3)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(clone.domain, NormOrder)
    assert clone.domain is not domain
    assert clone.domain.initial_order == 1.5
    assert clone.codomain.initial_order == 3.0
    clone.set_weights(layer.get_weights())  # the logits are among the weights
    assert float(clone.domain.order()) == pytest.approx(float(domain.order()), rel=1e-12)
    x = tf.random.stateless_normal((2, 3), (0, 1), dtype=tf.float64)
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy(), rtol=1e-12)


def test_learnable_update_inside_xla_matches_eager():
    eager, domain, codomain = learnable_dense(1.5, 3, units=5, n_in=4)
    compiled = dense(
        4, 5, domain=NormOrder(1.5, dtype="float64"), codomain=NormOrder(3.0, dtype="float64")
    )
    compiled.set_weights(eager.get_weights())
    expected = eager.update_lipschitz(7)
    got = tf.function(lambda: compiled.update_lipschitz(7), jit_compile=True)()
    assert float(got) == pytest.approx(float(expected), rel=1e-10)
    np.testing.assert_allclose(compiled.v.numpy(), eager.v.numpy(), rtol=1e-8, atol=1e-12)


# -- lipschitz_estimate="gram": normalised by a certified bound --------------------------------

GRAM_LAYERS = {
    "dense": (lambda **kw: dense(6, 4, **kw), [6]),
    "conv": (lambda **kw: conv((4, 4, 2), 3, 3, **kw), [4, 4, 2]),
    "conv_valid": (lambda **kw: conv((5, 4, 2), 3, 3, padding="valid", **kw), [5, 4, 2]),
    "conv_1x1": (lambda **kw: conv((3, 3, 4), 5, 1, **kw), [3, 3, 4]),
}


@pytest.mark.parametrize("name", sorted(GRAM_LAYERS))
@pytest.mark.parametrize("stddev", [0.01, 100.0])
def test_gram_normalised_layers_keep_their_bound_without_any_iteration(name, stddev):
    make, shape = GRAM_LAYERS[name]
    layer = make(stddev=stddev, lipschitz_estimate="gram", lipschitz_constant=0.9)
    assert layer.non_trainable_weights == []  # no power vectors to keep
    exact = np.linalg.norm(operator_matrix(layer, shape), 2)
    assert exact <= 0.9 * (1 + 1e-9)
    if stddev == 100.0:  # a kernel far outside: rescaled to within 1.2% of c
        assert exact >= 0.9 / 1.012
    # Any new kernel, as after an optimizer step: the bound holds at once.
    layer.kernel.assign(layer.kernel * 37.0)
    assert np.linalg.norm(operator_matrix(layer, shape), 2) <= 0.9 * (1 + 1e-9)


@pytest.mark.parametrize("name", ["dense", "conv"])
def test_gram_normalisation_gradients_match_finite_differences(name):
    """d/dW of <r, layer(x)> along random directions, through the bound's rescaling."""
    make, shape = GRAM_LAYERS[name]
    layer = make(stddev=2.0, lipschitz_estimate="gram", lipschitz_constant=0.9)
    x = tf.random.stateless_normal([3, *shape], seed=[1, 2], dtype=tf.float64)
    r = tf.random.stateless_normal(layer(x).shape, seed=[3, 4], dtype=tf.float64)
    kernel = tf.convert_to_tensor(layer.kernel)

    def objective(w):
        layer.kernel.assign(w)
        return float(tf.reduce_sum(r * layer(x)))

    with tf.GradientTape() as tape:
        value = tf.reduce_sum(r * layer(x))
    gradient = tape.gradient(value, layer.kernel)
    assert float(tf.norm(gradient)) > 0
    rng = np.random.default_rng(5)
    for _ in range(3):
        d = rng.normal(size=kernel.shape)
        h = 1e-6
        numerical = (objective(kernel + h * d) - objective(kernel - h * d)) / (2 * h)
        np.testing.assert_allclose(float(tf.reduce_sum(gradient * d)), numerical, rtol=1e-6)


def test_gram_estimate_needs_two_norms_and_survives_a_config_round_trip():
    with pytest.raises(ValueError, match=r"lipschitz_estimate='gram' bounds \(2, 2\) norms"):
        SpectralDense(3, lipschitz_estimate="gram", domain=3, codomain=3)
    with pytest.raises(ValueError, match="lipschitz_estimate"):
        SpectralDense(3, lipschitz_estimate="svd")
    closed = SpectralDense(3, lipschitz_estimate="gram", domain=1, codomain=2)  # exact anyway
    assert closed.lipschitz_estimate == "gram"
    layer = dense(4, 3, lipschitz_estimate="gram")
    clone = SpectralDense.from_config(layer.get_config())
    assert clone.lipschitz_estimate == "gram"
    clone.build((None, 4))
    clone.set_weights(layer.get_weights())
    x = tf.ones([2, 4], tf.float64)
    np.testing.assert_allclose(clone(x), layer(x), rtol=1e-12)
