"""Tests of tfp_resflow.layers.network: the Jacobian of a whole g respects Lip(g) <= c."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from checks import brute_force_induced_norm_2d

from tfp_resflow.layers.activation import CLipSwish, LipSwish
from tfp_resflow.layers.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    spectral_layers,
    update_lipschitz,
)
from tfp_resflow.layers.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.layers.norm_order import logit_of_order

CONVERGE = dict(atol=1e-7, rtol=1e-7, max_iterations=3000)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def jacobian_norms(g, x, order=2):
    """Operator norms (l_order -> l_order) of the Jacobian of g at each row of x."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reshape(g(x), [x.shape[0], -1])
    jac = tape.batch_jacobian(y, x)
    jac = tf.reshape(jac, [x.shape[0], y.shape[-1], -1]).numpy()
    return np.array([np.linalg.norm(j, order) for j in jac])


def inflate_and_converge(g, factor=4.0):
    """Scales every kernel up so that the soft rule binds, then converges the estimates."""
    for layer in spectral_layers(g):
        layer.kernel.assign(layer.kernel * factor)
    update_lipschitz(g, **CONVERGE)


MLPS = {
    "lipswish": dict(hidden_units=(16, 16)),
    "one-layer": dict(hidden_units=()),
    "elu-no-preact": dict(hidden_units=(16,), activation="elu", activation_first=False),
    "clipswish": dict(hidden_units=(16, 8), activation="clipswish"),
}


@pytest.mark.parametrize("kwargs", MLPS.values(), ids=MLPS.keys())
def test_mlp_jacobian_norm_at_most_c(kwargs):
    c = 0.9
    g = lipschitz_mlp(4, lipschitz_constant=c, dtype="float64", **kwargs)
    inflate_and_converge(g)
    x = tf.random.stateless_normal((20, 4), seed=(0, 1), dtype=tf.float64) * 3.0
    norms = jacobian_norms(g, x)
    assert norms.max() <= c * (1 + 1e-3)
    assert g(x).shape == (20, 4)


@pytest.mark.parametrize("order", [1, np.inf])
def test_mlp_with_mixed_norms_is_bounded_in_that_norm(order):
    c = 0.9
    g = lipschitz_mlp(3, (8, 8), lipschitz_constant=c, norm_orders=[order] * 4, dtype="float64")
    inflate_and_converge(g)
    x = tf.random.stateless_normal((20, 3), seed=(2, 3), dtype=tf.float64) * 3.0
    assert jacobian_norms(g, x, order).max() <= c * (1 + 1e-3)


CNNS = {
    "3-1-3": dict(),
    "first-block": dict(activation_first=False),
    "clipswish": dict(activation="clipswish"),
    "5-3": dict(kernel_sizes=(5, 3), activation="softplus"),
}


@pytest.mark.parametrize("kwargs", CNNS.values(), ids=CNNS.keys())
def test_cnn_jacobian_norm_at_most_c(kwargs):
    c = 0.98
    g = lipschitz_cnn((4, 4, 2), 8, lipschitz_constant=c, dtype="float64", **kwargs)
    inflate_and_converge(g)
    x = tf.random.stateless_normal((20, 4, 4, 2), seed=(4, 5), dtype=tf.float64) * 3.0
    norms = jacobian_norms(g, x)
    assert norms.max() <= c * (1 + 1e-3)
    assert g(x).shape == (20, 4, 4, 2)


def test_cnn_structure_follows_the_authors():
    g = lipschitz_cnn((4, 4, 3), 6)
    kinds = [type(layer).__name__ for layer in g.layers]
    assert kinds == ["LipSwish", "SpectralConv2D", "LipSwish", "SpectralConv2D", "LipSwish"] + [
        "SpectralConv2D"
    ]
    convs = [layer for layer in g.layers if isinstance(layer, SpectralConv2D)]
    assert [layer.kernel.shape for layer in convs] == [(3, 3, 3, 6), (1, 1, 6, 6), (3, 3, 6, 3)]
    assert all(layer.lipschitz_constant == 0.98 for layer in convs)
    activations = [layer for layer in g.layers if isinstance(layer, LipSwish)]
    assert len({id(layer.b) for layer in activations}) == 3  # one beta per activation
    first = lipschitz_cnn((4, 4, 3), 6, activation_first=False, activation="clipswish")
    assert isinstance(first.layers[0], SpectralConv2D)
    assert isinstance(first.layers[1], CLipSwish)
    assert first.layers[2].kernel.shape == (1, 1, 12, 6)  # CLipSwish doubled the width


def test_zero_init_last_makes_g_constant_and_config_round_trips():
    g = lipschitz_mlp(3, (5,), zero_init_last=True, power_iterations=2)
    x = tf.random.stateless_normal((4, 3), seed=(0, 0))
    np.testing.assert_array_equal(g(x).numpy(), np.zeros((4, 3)))
    assert [layer.power_iterations for layer in spectral_layers(g)] == [2, 2]
    clone = keras.Sequential.from_config(g.get_config())
    clone.set_weights(g.get_weights())
    dense = [layer for layer in clone.layers if isinstance(layer, SpectralDense)]
    assert [layer.units for layer in dense] == [5, 3]
    np.testing.assert_array_equal(clone(x).numpy(), g(x).numpy())


def test_learnable_orders_are_tied_around_g():
    g = lipschitz_mlp(3, (8, 8), norm_orders=[3, 1.5, 4, 3], learnable_norm_orders=True)
    first, middle, last = spectral_layers(g)
    assert first.codomain is middle.domain
    assert middle.codomain is last.domain
    assert last.codomain is first.domain  # g maps l_p0 to itself
    orders = [first.domain, middle.domain, last.domain]
    assert len({id(o) for o in orders}) == 3
    assert [o.initial_order for o in orders] == [3.0, 1.5, 4.0]
    logits = [w for w in g.trainable_weights if w.path.endswith("/logit")]
    assert len(logits) == 3  # one per boundary, however many layers share it
    cnn = lipschitz_cnn((4, 4, 2), 4, (3, 1, 3), learnable_norm_orders=True)
    convs = spectral_layers(cnn)
    assert all(a.codomain is b.domain for a, b in zip(convs, convs[1:] + convs[:1], strict=True))


def test_g_with_learned_orders_is_bounded_in_the_learned_norm():
    c = 0.9
    g = lipschitz_mlp(2, (8, 8), lipschitz_constant=c, learnable_norm_orders=True, dtype="float64")
    first, middle, last = spectral_layers(g)
    learned = (3.1, 1.4, 4.0)  # as if trained
    for order, p in zip((first.domain, middle.domain, last.domain), learned, strict=True):
        order.logit.assign(logit_of_order(p))
    inflate_and_converge(g)
    p0 = float(first.domain.order())
    assert p0 == pytest.approx(3.1, rel=1e-9)
    x = tf.random.stateless_normal((20, 2), seed=(4, 5), dtype=tf.float64) * 3.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = g(x)
    jacobians = tape.batch_jacobian(y, x).numpy()
    norms = np.array([brute_force_induced_norm_2d(j, p0, p0) for j in jacobians])
    assert norms.max() <= c * (1 + 1e-3)
    assert all(float(layer.sigma()) > c for layer in (first, middle, last))  # rule binds


def test_keras_file_keeps_the_ties_and_the_learned_orders(tmp_path):
    g = lipschitz_mlp(3, (5,), learnable_norm_orders=True, norm_orders=[2.5, 1.5, 2.5])
    for layer, shift in zip(spectral_layers(g), (0.3, -0.2), strict=True):
        layer.domain.logit.assign_add(shift)
    g.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras")
    first, last = spectral_layers(loaded)
    assert first.codomain is last.domain
    assert last.codomain is first.domain
    for a, b in zip(spectral_layers(g), (first, last), strict=True):
        assert float(b.domain.order()) == float(a.domain.order())
    x = tf.random.stateless_normal((4, 3), seed=(0, 3))
    np.testing.assert_array_equal(loaded(x).numpy(), g(x).numpy())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lipschitz_mlp(0), "event_size must be a positive integer; got 0"),
        (lambda: lipschitz_mlp(3, 4), "hidden_units must be a tuple of integers >= 1; got 4"),
        (
            lambda: lipschitz_mlp(3, (4, 0)),
            "hidden_units must be a tuple of integers >= 1; got (4, 0)",
        ),
        (lambda: lipschitz_mlp(3, lipschitz_constant=1.0), "got 1.0"),
        (lambda: lipschitz_mlp(3, activation="relu"), "got 'relu'"),
        (lambda: lipschitz_mlp(3, (4,), norm_orders=[2, 2]), "needs 3 entries"),
        (lambda: lipschitz_mlp(3, (4,), norm_orders=[1, 2, 2]), "start and end"),
        (lambda: lipschitz_mlp(3, (4,), norm_orders=[2, 0.5, 2]), "got 0.5"),
        (
            lambda: lipschitz_mlp(3, (4,), activation="clipswish", norm_orders=[1, 1, 1]),
            "l2 only",
        ),
        (
            lambda: lipschitz_mlp(3, (4,), activation="clipswish", learnable_norm_orders=True),
            "l2 only",
        ),
        (
            lambda: lipschitz_mlp(3, (4,), norm_orders=[1, 2, 1], learnable_norm_orders=True),
            "learnable norm_orders start in (1, 5); got [1.0, 2.0, 1.0]",
        ),
        (lambda: lipschitz_mlp(3, learnable_norm_orders="yes"), "must be a bool; got 'yes'"),
        (lambda: lipschitz_mlp(3, (4,), norm_orders="222"), "sequence of orders; got '222'"),
        (lambda: lipschitz_cnn((4, 4)), "input_shape must be (height, width, channels)"),
        (lambda: lipschitz_cnn((4, 4, 2), 0), "hidden_channels"),
        (lambda: lipschitz_cnn((4, 4, 2), 8, (3, 2)), "odd"),
        (lambda: lipschitz_cnn((4, 4, 2), 8, ()), "kernel_sizes must be a non-empty tuple"),
        (lambda: lipschitz_cnn((4, 4, 2), 8, lipschitz_constant=0), "got 0"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ------------------------------------------------------------------------------------------------
# Conditional g(x, c): Lipschitz in x for every context


def perturb_context_network(g, scale):
    """Moves every weight that only the context reaches (its network and the shifts)."""
    rng = np.random.default_rng(7)
    for layer in g.layers:
        if layer.name.startswith("context"):
            for weight in layer.trainable_weights:
                weight.assign(scale * rng.normal(size=weight.shape))


def conditional_jacobian_norms(g, x, c):
    return jacobian_norms(lambda t: g([t, c]), x)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: shifts in the hundreds
@pytest.mark.parametrize(
    "build",
    [
        lambda: lipschitz_mlp(4, (16, 16), context_size=3, dtype="float64"),
        lambda: lipschitz_mlp(4, (16, 8), activation="clipswish", context_size=3, dtype="float64"),
        lambda: lipschitz_cnn((4, 4, 2), 8, context_size=3, dtype="float64"),
    ],
    ids=["mlp", "mlp-clipswish", "cnn"],
)
def test_conditional_g_is_a_contraction_in_x_for_every_context(build, scale):
    g = build()
    inflate_and_converge(g)
    perturb_context_network(g, scale)
    x_shape = g.inputs[0].shape[1:]
    x = tf.random.stateless_normal((8, *x_shape), seed=(0, 1), dtype=tf.float64) * 3.0
    bound = max(layer.lipschitz_constant for layer in spectral_layers(g))
    outputs = []
    for seed in range(4):  # random contexts, far from the origin too
        c = tf.random.stateless_normal((8, 3), seed=(seed, 9), dtype=tf.float64) * 10.0**seed
        norms = conditional_jacobian_norms(g, x, c)
        assert norms.max() <= bound * (1 + 1e-3), norms.max()
        outputs.append(g([x, c]).numpy())
    # The context matters: different contexts, different g (the bound is not met vacuously).
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3


def test_conditional_g_starts_independent_of_the_context():
    g = lipschitz_mlp(3, (8,), context_size=2, dtype="float64")
    x = tf.random.stateless_normal((5, 3), seed=(1, 2), dtype=tf.float64)
    c1 = tf.random.stateless_normal((5, 2), seed=(3, 4), dtype=tf.float64)
    np.testing.assert_array_equal(g([x, c1]), g([x, 5.0 * c1]))  # shifts start at zero
    assert [tuple(t.shape) for t in g.inputs] == [(None, 3), (None, 2)]
    unconditional = lipschitz_mlp(3, (8,), dtype="float64")
    assert len(spectral_layers(g)) == len(spectral_layers(unconditional))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(context_size=0), "context_size must be None or an integer >= 1"),
        (dict(context_size=2, context_hidden_units=(0,)), "context_hidden_units"),
    ],
)
def test_bad_context_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lipschitz_mlp(3, (8,), **kwargs)
