"""Tests of the joint inverse-and-log-det pass and of StackedBijector's walk.

The joint pass must equal `inverse` plus `inverse_log_det_jacobian` for a fixed seed, in value
(eager and `tf.function`) and in gradient (float64, exact and unbiased estimators), for every
bijector of the package, for chains of them and for any other TFP bijector.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors import composite
from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.image import LogitTransform, Squeeze
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.configs.config_fields import with_fields
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.layers.network import lipschitz_mlp

tfb = tfp.bijectors

IMAGE = ImageFlowConfig(
    blocks_per_scale=(1, 1),
    hidden_channels=4,
    fc_end_blocks=1,
    fc_hidden_units=(8,),
    factor_out=True,
    initial_power_iterations=20,
)


def vector_flow(log_det="unbiased"):
    flow = ResidualFlowBijector(num_blocks=2, hidden_units=(8,), log_det=log_det)
    flow.build(3, dtype="float64")
    return flow


def image_flow():
    return MultiscaleResidualFlow((4, 4, 2), IMAGE, dtype="float64")


def residual_block():
    g = lipschitz_mlp(3, (8,), dtype="float64", initial_power_iterations=50)
    return ResidualBlock(g)


def vector_data(seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(5, 3)), tf.float64)


def image_data(seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(0.1, 0.9, size=(5, 4, 4, 2)))


# name -> (bijector factory, data factory, event_ndims of the data)
CASES = {
    "residual-block": (residual_block, vector_data, 1),
    "actnorm": (lambda: ActNorm(ActNormLayer(dtype="float64")), vector_data, 1),
    "squeeze": (Squeeze, image_data, 3),
    "logit": (lambda: LogitTransform(0.05), image_data, 3),
    "residual-flow": (vector_flow, vector_data, 1),
    "multiscale-flow": (image_flow, image_data, 3),
    "chain-with-shift": (
        lambda: tfb.Chain([vector_flow(), tfb.Shift(tf.constant(0.5, tf.float64))]),
        vector_data,
        1,
    ),
    "invert-of-exp": (lambda: tfb.Invert(tfb.Exp()), lambda: tf.abs(vector_data()) + 0.5, 1),
}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def seed_kwargs(bijector, seed):
    """The seed as TFP passes it: by name to a Chain's members that take one."""
    if hasattr(bijector, "bijectors"):  # a Chain passes kwargs to its members by name
        return {b.name: {"seed": seed} for b in bijector.bijectors if not isinstance(b, tfb.Shift)}
    if isinstance(bijector, tfb.Invert):
        return {}
    return {"seed": seed}


def two_calls(bijector, y, event_ndims, seed):
    kwargs = seed_kwargs(bijector, seed)
    x = bijector.inverse(tf.identity(y), **kwargs)
    ildj = bijector.inverse_log_det_jacobian(tf.identity(y), event_ndims=event_ndims, **kwargs)
    return x, ildj


def joint(bijector, y, event_ndims, seed):
    kwargs = seed_kwargs(bijector, seed)
    return composite.inverse_and_log_det(
        bijector, tf.identity(y), event_ndims=event_ndims, **kwargs
    )


@pytest.mark.parametrize("execution", ["eager", "function"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_joint_pass_equals_inverse_and_log_det_for_a_seed(name, execution):
    make, make_data, event_ndims = CASES[name]
    bijector, y = make(), make_data()
    bijector.inverse(y)  # data-dependent initialisation (ActNorm) first
    seed = [3, 4]

    def both(y):
        return two_calls(bijector, y, event_ndims, seed), joint(bijector, y, event_ndims, seed)

    if execution == "function":
        both = tf.function(both)
    (x, ildj), (x_joint, ildj_joint) = both(y)
    np.testing.assert_allclose(x_joint, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ildj_joint, ildj, rtol=1e-12, atol=1e-12)
    assert ildj_joint.shape == ildj.shape  # TFP's: [] for constant Jacobians, else batch shape


@pytest.mark.parametrize("log_det", ["exact", "unbiased"])
@pytest.mark.parametrize("flow_kind", ["vector", "image"])
def test_gradients_of_the_joint_pass_equal_those_of_the_two_calls(flow_kind, log_det):
    if flow_kind == "vector":
        flow, y, event_ndims = vector_flow(log_det), vector_data(), 1
    else:
        config = with_fields(IMAGE, log_det=log_det, factor_out=False)
        flow = MultiscaleResidualFlow((4, 4, 2), config, dtype="float64")
        y, event_ndims = image_data(), 3
    flow.inverse(y)  # ActNorm initialisation
    rng = np.random.default_rng(1)
    for variable in flow.trainable_variables:  # away from the initialisation
        variable.assign_add(0.05 * rng.normal(size=variable.shape))
    variables = flow.trainable_variables
    weight = tf.constant(rng.normal(size=y.shape[:1]), tf.float64)  # per-example loss weights

    def loss_and_gradients(pass_fn):
        y_in = tf.identity(y)
        with tf.GradientTape() as tape:
            tape.watch(y_in)
            x, ildj = pass_fn(flow, y_in, event_ndims, [7, 8])
            x_flat = tf.reshape(x, [tf.shape(x)[0], -1])
            loss = tf.reduce_sum(weight * (tf.reduce_sum(x_flat**2, axis=1) - ildj))
        return loss, tape.gradient(loss, [y_in, *variables])

    with training_mode(True):
        loss, gradients = loss_and_gradients(two_calls)
        loss_joint, gradients_joint = loss_and_gradients(joint)
    np.testing.assert_allclose(loss_joint, loss, rtol=1e-12)
    assert len(gradients) == len(variables) + 1
    for expected, actual in zip(gradients, gradients_joint, strict=True):
        assert expected is not None
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


def test_stacked_bijector_seeds_block_k_with_fold_in_of_k():
    flow = vector_flow()
    y = vector_data()
    flow.inverse(y)
    seed = tf.constant([5, 6], tf.int64)
    from tfp_resflow.core import stateless_random

    t, expected = tf.identity(y), 0.0
    for step in flow._steps:
        b = step.bijector
        kwargs = {}
        if isinstance(b, ResidualBlock):
            k = flow.blocks.index(b)
            kwargs["seed"] = stateless_random.fold_in(stateless_random.sanitize_seed(seed), k)
        expected += b.inverse_log_det_jacobian(t, event_ndims=1, **kwargs)
        t = b.inverse(t)
    _, ildj = flow.inverse_and_log_det(tf.identity(y), seed=seed)
    np.testing.assert_allclose(ildj, expected, rtol=1e-12)


def test_event_ndims_above_the_minimum_sums_the_extra_dimensions():
    flow = vector_flow("exact")
    y = tf.reshape(tf.tile(vector_data(), [2, 1]), [2, 5, 3])
    _, per_event = flow.inverse_and_log_det(y)
    _, summed = flow.inverse_and_log_det(y, event_ndims=2)
    assert per_event.shape == (2, 5)
    np.testing.assert_allclose(summed, tf.reduce_sum(per_event, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("event_ndims", [0, 1.5, True])
def test_bad_event_ndims_are_rejected(event_ndims):
    flow = vector_flow("exact")
    with pytest.raises(ValueError, match="event_ndims must be"):
        flow.inverse_and_log_det(vector_data(), event_ndims=event_ndims)


def test_image_flow_latent_parts_and_forward_walk_back():
    flow = image_flow()
    assert flow.latent_shapes == [(2, 2, 4), (16,)]  # factored half, then the final vector
    y = image_data()
    flow.inverse(y)
    z, _ = flow.inverse_and_log_det(tf.identity(y))
    assert z.shape == (5, 32)
    np.testing.assert_allclose(flow.forward(tf.identity(z)), y, atol=1e-9)


def test_lipschitz_estimate_reaches_every_layer_of_both_flows():
    from tfp_resflow.bijectors import multiscale
    from tfp_resflow.configs.flow_configs import ImageFlowConfig, ResidualFlowConfig
    from tfp_resflow.layers import lipschitz

    for config in (
        ResidualFlowConfig(num_blocks=2, hidden_units=(4,), lipschitz_estimate="gram"),
        ResidualFlowConfig(
            num_blocks=1, hidden_units=(4,), network="dense", lipschitz_estimate="gram"
        ),
    ):
        flow = ResidualFlowBijector(config, event_size=2)
        flow.forward(tf.zeros([1, 2]))
        layers = lipschitz.spectral_layers(flow.keras_layers)
        assert layers
        assert {layer.lipschitz_estimate for layer in layers} == {"gram"}
    image = ImageFlowConfig(
        blocks_per_scale=(1,), hidden_channels=4, fc_end_blocks=1, lipschitz_estimate="gram"
    )
    flow = multiscale.image_flow((4, 4, 1), image)
    flow.inverse(tf.fill([1, 4, 4, 1], 0.5))
    layers = lipschitz.spectral_layers(flow.keras_layers)
    assert len(layers) >= 4
    assert {layer.lipschitz_estimate for layer in layers} == {"gram"}
