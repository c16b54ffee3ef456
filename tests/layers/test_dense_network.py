"""Tests of dense_network: the i-DenseNet g keeps Lip(g) <= c, whatever its weights.

The true Lipschitz constant of g (l2) is the supremum of ||J_g(x)||_2 over x. It is estimated
from below, in float64: the largest Jacobian norm over many random points at several scales,
then gradient ascent on ||J_g(x)||_2 from the best of them. The bound must hold for that
estimate after the norm estimates converge, for random and for adversarial weights, and fail
when the concatenation's normalisation is removed.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.bijectors.block_functions import structure_key
from tfp_resflow.layers import dense_network
from tfp_resflow.layers.dense_network import (
    LipschitzDenseLayer,
    concatenation_weights,
    dense_cnn,
    dense_mlp,
)
from tfp_resflow.layers.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    spectral_layers,
    update_lipschitz,
)

C = 0.9
CONVERGE = dict(atol=1e-6, rtol=1e-6, max_iterations=5000)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def jacobians(g, x):
    """`[batch, out, in]` Jacobians of g at each example of x (any event shape)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reshape(g(x), [x.shape[0], -1])
    return tf.reshape(tape.batch_jacobian(y, x), [x.shape[0], y.shape[-1], -1])


def jacobian_norms(g, x):
    """`[batch]` spectral norms of the Jacobian of g at each example of x."""
    return tf.linalg.svd(jacobians(g, x), compute_uv=False)[:, 0]


def ascent_step(g, x, step_size):
    """x moved by `step_size` along the gradient of ||J_g(x)||_2, per example.

    The gradient is that of u^T J_g(x) v at the top singular pair (u, v) of J_g(x).
    """
    _, u, v = tf.linalg.svd(jacobians(g, x))
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf.autodiff.ForwardAccumulator(x, tf.reshape(v[:, :, 0], x.shape)) as accumulator:
            y = g(x)
        jv = tf.reshape(accumulator.jvp(y), [x.shape[0], -1])  # J v
        top = tf.reduce_sum(u[:, :, 0] * jv)
    grad = tape.gradient(top, x)
    size = tf.norm(tf.reshape(grad, [x.shape[0], -1]), axis=1)
    return x + step_size * grad / tf.reshape(size + 1e-30, [-1] + [1] * (x.shape.rank - 1))


def lipschitz_lower_bound(g, event_shape, *, points=256, ascent_starts=8, steps=20):
    """max ||J_g(x)||_2 over random points at 4 scales, then gradient ascent from the best."""
    norms_of = tf.function(lambda x: jacobian_norms(g, x))
    step = tf.function(lambda x, size: ascent_step(g, x, size))
    rng = np.random.default_rng(0)
    scales = np.repeat([0.3, 1.0, 3.0, 10.0], points // 4)[:, None]
    x = rng.normal(size=(points, int(np.prod(event_shape)))) * scales
    x = tf.constant(x.reshape(points, *event_shape), tf.float64)
    norms = norms_of(x)
    best = float(tf.reduce_max(norms))
    x = tf.gather(x, tf.argsort(norms, direction="DESCENDING")[:ascent_starts])
    for i in range(steps):
        x = step(x, tf.constant(0.3 * 0.85**i, tf.float64))
        best = max(best, float(tf.reduce_max(norms_of(x))))
    return best


def build(kind, activation):
    """A tiny dense g: vectors of 3 (growths 4, 6), or 4x4x2 images (growth 4, kernels 3-1-1)."""
    if kind == "vector":
        g = dense_mlp(3, (4, 6), lipschitz_constant=C, activation=activation, dtype="float64")
        return g, (3,)
    g = dense_cnn(
        (4, 4, 2), 4, (3, 3, 1), lipschitz_constant=C, activation=activation, dtype="float64"
    )
    return g, (4, 4, 2)


def dense_layers(g):
    return [layer for layer in g.layers if isinstance(layer, LipschitzDenseLayer)]


def make_adversarial(g):
    """Kernels x100 (the soft rule must bind), large and odd concatenation logits."""
    for layer in spectral_layers(g):
        layer.kernel.assign(layer.kernel * 100.0)
        layer.bias.assign(layer.bias + 3.0)
    for layer, logits in zip(dense_layers(g), [(30.0, -30.0), (-7.5, 12.0)], strict=False):
        layer.concatenation_logits.assign(logits)


ACTIVATIONS = ["lipswish", "clipswish", "elu"]


@pytest.mark.parametrize("weights", ["random", "adversarial"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["vector", "image"])
def test_lipschitz_constant_of_g_is_at_most_c(kind, activation, weights):
    # Both g's chain 3 maps of constant <= c (2 dense layers, the last linear layer), so the
    # derivation gives Lip(g) <= c**3 < c: the test checks that tighter bound.
    g, shape = build(kind, activation)
    if weights == "adversarial":
        make_adversarial(g)
    update_lipschitz(g, **CONVERGE)
    lip = lipschitz_lower_bound(g, shape)
    assert lip <= C**3 * (1 + 1e-6), lip
    assert lip > 0.1  # the estimate sees g at all


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_the_bound_is_attained(kind):
    # eta_2 ~ 0 and a last layer reading only the input's copy: g(x) ~ c * eta_1**2 * x with
    # eta_1 ~ c, so Lip(g) ~ c**3. The estimate gets there: the bound is tight and the
    # estimator finds maxima.
    g, shape = build(kind, "lipswish")
    for layer in dense_layers(g):
        layer.concatenation_logits.assign([30.0, -30.0])
    last = spectral_layers(g)[-1]
    channels = shape[-1]
    kernel = np.zeros(last.kernel.shape)
    kernel[..., np.arange(channels), np.arange(channels)] = 100.0
    last.kernel.assign(kernel)
    update_lipschitz(g, **CONVERGE)
    lip = lipschitz_lower_bound(g, shape)
    assert C**3 * 0.999 <= lip <= C**3 * (1 + 1e-6)


def test_without_the_normalisation_the_bound_fails(monkeypatch):
    # The same g and weights with eta = softplus(k) + 0.1 left unnormalised (each ~5): the
    # estimate then exceeds c, so the check above would catch a missing normalisation.
    g, shape = build("vector", "lipswish")
    for layer in dense_layers(g):
        layer.concatenation_logits.assign([5.0, 5.0])
    update_lipschitz(g, **CONVERGE)
    assert lipschitz_lower_bound(g, shape) <= C * (1 + 1e-6)
    raw = lambda logits, c: tf.nn.softplus(logits) + dense_network.CONCATENATION_OFFSET  # noqa: E731
    monkeypatch.setattr(dense_network, "concatenation_weights", raw)
    assert lipschitz_lower_bound(g, shape) > 1.5 * C


@pytest.mark.parametrize("logits", [(1.0, 1.0), (30.0, -30.0), (-40.0, -40.0), (0.3, 7.0)])
def test_concatenation_weights_are_positive_with_l2_norm_c(logits):
    eta = concatenation_weights(tf.constant(logits, tf.float64), C).numpy()
    assert np.all(eta > 0)
    np.testing.assert_allclose(np.linalg.norm(eta), C, rtol=1e-12)
    if logits[0] == logits[1]:
        np.testing.assert_allclose(eta, C / np.sqrt(2), rtol=1e-12)


@pytest.mark.parametrize("learnable", [True, False])
def test_dense_layer_concatenates_the_scaled_input_and_new_features(learnable):
    linear = SpectralDense(2, lipschitz_constant=C, dtype="float64")
    layer = LipschitzDenseLayer(
        linear,
        keras.layers.Identity(dtype="float64"),
        lipschitz_constant=C,
        learnable_concatenation=learnable,
        dtype="float64",
    )
    x = tf.constant([[1.0, -2.0, 0.5]], tf.float64)
    y = layer(x).numpy()
    eta = C / np.sqrt(2)  # both logits start at 1
    np.testing.assert_allclose(y[:, :3], eta * x.numpy(), rtol=1e-12)
    np.testing.assert_allclose(y[:, 3:], eta * linear(x).numpy(), rtol=1e-12)
    trainable = any(w is layer.concatenation_logits for w in layer.trainable_weights)
    assert trainable == learnable


def test_structure_follows_the_authors():
    # Growth 8 with CLipSwish: each convolution gives 4 channels, doubled to 8; the input of
    # layer i has 3 + 8 i channels; the last convolution maps 3 + 3 * 8 = 27 back to 3.
    g = dense_cnn((4, 4, 3), 8, (3, 3, 3, 1), activation="clipswish")
    convs = [layer for layer in spectral_layers(g) if isinstance(layer, SpectralConv2D)]
    assert [tuple(layer.kernel.shape) for layer in convs] == [
        (3, 3, 3, 4),
        (3, 3, 11, 4),
        (3, 3, 19, 4),
        (1, 1, 27, 3),
    ]
    # The fully connected g of an image flow: a projection to 64, growths 32 (16 doubled).
    g = dense_mlp(48, (32, 32, 32), projection_units=64, activation="clipswish")
    kernels = [tuple(layer.kernel.shape) for layer in spectral_layers(g)]
    assert kernels == [(48, 64), (64, 16), (96, 16), (128, 16), (160, 48)]
    assert g(tf.zeros((2, 48))).shape == (2, 48)


def test_config_round_trip_and_shared_traces():
    g = dense_mlp(3, (4, 6), activation="clipswish", dtype="float64")
    x = tf.random.stateless_normal((5, 3), seed=(1, 2), dtype=tf.float64)
    copy = keras.Sequential.from_config(g.get_config())
    copy.set_weights(g.get_weights())
    np.testing.assert_array_equal(copy(x), g(x))
    # Two g's of one structure share one trace of the block's passes.
    other = dense_mlp(3, (4, 6), activation="clipswish", dtype="float64")
    assert structure_key(g) is not None
    assert structure_key(g) == structure_key(other)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dense_mlp(3, (5,), activation="clipswish"), r"growths must be growths divisible"),
        (lambda: dense_mlp(3, (0,)), r"growths must be a tuple of integers >= 1"),
        (lambda: dense_cnn((4, 4, 2), 7, activation="clipswish"), r"growth must be growths"),
        (lambda: dense_cnn((4, 4, 2), 4, (3, 2)), r"kernel_sizes must be a non-empty tuple of odd"),
        (lambda: dense_mlp(3, (4,), projection_units=0), r"projection_units must be a positive"),
        (lambda: dense_mlp(3, (4,), lipschitz_constant=1.0), r"lipschitz_constant must be"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
