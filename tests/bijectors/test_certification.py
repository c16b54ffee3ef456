"""Certified bounds against exact operator norms, brute-force Jacobians and broken layers."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from spectral_checks import CONVERGE, conv, dense, learnable_dense, operator_matrix

from tfp_resflow.bijectors.certification import (
    CertificationWarning,
    certify,
    layer_bound,
    residual_function_bound,
    uncertified_blocks,
)
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.configs.flow_configs import ResidualFlowConfig
from tfp_resflow.layers import gram_iteration
from tfp_resflow.layers.dense_network import dense_mlp
from tfp_resflow.layers.lipschitz import SpectralDense
from tfp_resflow.layers.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.models.model import FlowModel

tfb = tfp.bijectors

C = 0.9


def exact_norm(layer, in_shape) -> float:
    """The spectral norm of the map the layer applies, from its explicit matrix."""
    return float(np.linalg.norm(operator_matrix(layer, in_shape), 2))


def converged(layer):
    layer.update_lipschitz(**CONVERGE)
    return layer


@pytest.mark.parametrize("stddev", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("shape", [(3, 5), (16, 4), (32, 32)])
def test_dense_bound_is_above_the_exact_norm_and_tight(shape, stddev):
    layer = converged(dense(shape[0], shape[1], stddev=stddev, lipschitz_constant=C))
    exact = exact_norm(layer, [shape[0]])
    assert exact <= C * (1 + 1e-6)  # the normalised layer keeps its constant...
    bound = layer_bound(layer)
    assert exact <= bound <= exact * 1.002  # ...and the certificate sees it


@pytest.mark.parametrize(
    ("in_shape", "filters", "kernel_size", "padding"),
    [((5, 5, 2), 3, 3, "same"), ((4, 6, 3), 2, 3, "valid"), ((6, 6, 1), 4, 5, "same")],
)
@pytest.mark.parametrize("explicit", [True, False])
def test_convolution_bound_is_above_the_exact_norm(
    in_shape, filters, kernel_size, padding, explicit, monkeypatch
):
    if not explicit:  # force the circular-convolution bound
        monkeypatch.setattr(gram_iteration, "EXPLICIT_OPERATOR_ENTRIES", 0)
    layer = converged(conv(in_shape, filters, kernel_size, stddev=30.0, padding=padding))
    exact = exact_norm(layer, list(in_shape))
    assert exact <= 0.97 * (1 + 1e-6)
    bound = layer_bound(layer)
    assert exact <= bound <= exact * (1.002 if explicit else 1.6)


def test_one_by_one_convolution_uses_its_channel_matrix():
    layer = converged(conv((4, 4, 3), 5, 1, stddev=3.0))
    exact = exact_norm(layer, [4, 4, 3])
    assert exact <= layer_bound(layer) <= exact * 1.002


def test_an_unconverged_estimate_is_caught():
    """A stored power vector along the weakest direction: sigma is far too low, so the
    rescaled kernel exceeds its constant. The certificate is not fooled."""
    layer = dense(6, 6, stddev=1.0, lipschitz_constant=C)
    kernel = layer.kernel.numpy()
    u, s, vt = np.linalg.svd(kernel.T)  # forward(v) = v @ kernel = (kernel^T v^T)^T
    layer.v.assign(vt[-1][None, :])
    exact = exact_norm(layer, [6])
    assert exact > 1.5  # C * s_max / s_min
    assert layer_bound(layer) >= exact


@pytest.mark.parametrize(("p", "q"), [(1, 2), (1, 1), (1, 3), (2, "inf"), ("inf", "inf")])
def test_closed_form_orders_are_certified_exactly(p, q):
    layer = converged(dense(4, 3, stddev=2.0, lipschitz_constant=C, domain=p, codomain=q))
    matrix = operator_matrix(layer, [4])  # [3, 4]
    p_, q_ = (math.inf if r == "inf" else float(r) for r in (p, q))
    if p_ == 1:  # the largest column q-norm
        exact = np.linalg.norm(matrix, q_, axis=0).max()
    else:  # the largest row p*-norm
        exact = np.linalg.norm(matrix, 1.0 if p_ == math.inf else p_ / (p_ - 1), axis=1).max()
    assert exact <= layer_bound(layer) <= exact * (1 + 1e-8)
    assert layer_bound(layer) <= C * (1 + 1e-6)


def test_mixed_norms_without_a_closed_form_are_not_certified():
    layer = converged(dense(4, 3, lipschitz_constant=C, domain=3, codomain=3))
    with pytest.warns(CertificationWarning, match=r"mixed \(3, 3\) norm"):
        assert layer_bound(layer) == math.inf
    learned, _, _ = learnable_dense(1.5, "same")
    with pytest.warns(CertificationWarning, match="learnable norm order"):
        assert layer_bound(learned) == math.inf


def jacobian_norms(g, x, context=None) -> np.ndarray:
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = g(x) if context is None else g([x, context])
        y = tf.reshape(y, [x.shape[0], -1])
    jacobian = tape.batch_jacobian(y, x)
    jacobian = tf.reshape(jacobian, [x.shape[0], y.shape[1], -1])
    return np.linalg.norm(jacobian.numpy(), 2, axis=(-2, -1))


G_BUILDERS = {
    "lipswish": lambda: lipschitz_mlp(3, (16, 16), activation="lipswish", dtype="float64"),
    "clipswish": lambda: lipschitz_mlp(3, (16, 16), activation="clipswish", dtype="float64"),
    "elu": lambda: lipschitz_mlp(3, (16,), activation="elu", dtype="float64"),
    "dense": lambda: dense_mlp(3, (8, 8), dtype="float64"),
    "conditional": lambda: lipschitz_mlp(3, (16,), context_size=2, dtype="float64"),
    "cnn": lambda: lipschitz_cnn((4, 4, 2), 6, (3, 1, 3), dtype="float64"),
}


@pytest.mark.parametrize("name", sorted(G_BUILDERS))
def test_residual_function_bound_is_above_every_jacobian_norm(name):
    keras.utils.set_random_seed(0)
    g = G_BUILDERS[name]()
    shape = [4, 4, 2] if name == "cnn" else [3]
    x = tf.random.normal([64, *shape], stddev=3.0, dtype=tf.float64)
    context = None
    if name == "conditional":
        context = tf.random.normal([64, 2], stddev=5.0, dtype=tf.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificationWarning)
        bound = residual_function_bound(g)
    assert jacobian_norms(g, x, context).max() <= bound < 1.0


def test_a_linear_g_is_certified_at_its_norm():
    keras.utils.set_random_seed(1)
    g = keras.Sequential([keras.Input((3,), dtype="float64"), SpectralDense(3, dtype="float64")])
    converged(g.layers[0])
    assert residual_function_bound(g) == pytest.approx(exact_norm(g.layers[0], [3]), rel=2e-3)


def test_an_unconstrained_layer_on_the_path_is_not_certified_but_one_on_the_context_is():
    x = keras.Input((3,), dtype="float64")
    c = keras.Input((2,), dtype="float64")
    shift = keras.layers.Dense(3, dtype="float64", name="free_context_net")(c)
    y = keras.layers.Add(dtype="float64")([SpectralDense(3, dtype="float64")(x), shift])
    assert residual_function_bound(keras.Model([x, c], y)) < 1.0
    free = keras.Model([x, c], keras.layers.Dense(3, dtype="float64", name="free")(x))
    with pytest.warns(CertificationWarning, match="free: no certified bound for a Dense"):
        assert residual_function_bound(free) == math.inf


def small_flow(num_blocks=3, name="residual_flow"):
    config = ResidualFlowConfig(num_blocks=num_blocks, hidden_units=(8,), lipschitz_constant=C)
    flow = ResidualFlowBijector(config, name=name)
    model = FlowModel(flow, event_shape=[2])
    model.build(model.input_shape_for_build())
    return flow, model


def test_flows_give_one_bound_per_block_in_data_to_latent_order():
    keras.utils.set_random_seed(2)
    flow, model = small_flow()
    bounds = certify(flow)
    assert len(bounds) == 3
    assert all(0 < b < 1 for b in bounds)
    assert certify(model) == bounds
    assert certify(tfb.Invert(flow)) == bounds
    other, _ = small_flow(2, name="other")
    # tfb.Chain([b, a]) applies a first: a's blocks come first from data to latent.
    chained = certify(tfb.Chain([other, flow]))
    assert chained == bounds + certify(other)


def test_a_broken_block_is_reported():
    keras.utils.set_random_seed(3)
    flow, _ = small_flow()
    for layer in flow.blocks[1].residual_fn.layers:
        if hasattr(layer, "v"):  # every linear layer's estimate along its weakest direction
            _, _, vt = np.linalg.svd(layer.kernel.numpy().T)
            layer.v.assign(tf.cast(vt[-1][None, :], layer.v.dtype))
    with pytest.warns(CertificationWarning, match=r"1 of 3 residual blocks.*blocks \[1\]"):
        bounds = certify(flow)
    assert uncertified_blocks(bounds) == [1]


def test_flows_without_blocks_have_nothing_to_certify_and_other_objects_are_refused():
    assert certify(tfb.Exp()) == []
    with pytest.raises(TypeError, match="a Keras layer, a bijector or a FlowModel"):
        certify("flow")
    with pytest.raises(TypeError, match="SpectralDense or SpectralConv2D"):
        layer_bound(keras.layers.Dense(2))
