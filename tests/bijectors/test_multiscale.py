"""Tests of MultiscaleResidualFlow and ImageFlowConfig: round trips, log-dets, bits, saving."""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from checks import assert_finite, brute_force_inverse_log_det

from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow, scale_shapes
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.configs.config_fields import to_dict, with_fields
from tfp_resflow.configs.flow_configs import BlockConfig, ImageFlowConfig
from tfp_resflow.estimators import logdet
from tfp_resflow.layers import lipschitz
from tfp_resflow.models.model import FlowModel

tfb, tfd = tfp.bijectors, tfp.distributions

# Tiny widths: the tests check the plumbing, not the capacity. The norm estimates converge at
# build (to 1e-6), which the fixed-point inverses of the round trips rely on; `FAST` skips most
# of that for tests where the Lipschitz bound does not matter (exact log-dets, shapes, errors).
TINY = ImageFlowConfig(
    blocks_per_scale=(1, 1),
    hidden_channels=4,
    fc_end_blocks=1,
    fc_hidden_units=(8,),
    logit_alpha=0.05,
)
FAST = {"initial_power_iterations": 10}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def tiny(**changes):
    return with_fields(TINY, **changes)  # block fields (log_det, ...) go to TINY.block


def uniform_images(shape, seed=0, dtype=np.float64):
    return tf.constant(np.random.default_rng(seed).uniform(size=shape), dtype)


def perturbed_flow(input_shape, config, *, seed=3):
    """A float64 flow moved away from its initialisation.

    ActNorm is initialised from data, then every weight but the kernels is shifted, so the
    kernels' norm estimates from the build stay valid.
    """
    flow = MultiscaleResidualFlow(input_shape, config, dtype="float64")
    flow.inverse(uniform_images((32, *input_shape), seed=seed))  # ActNorm's data-dependent init
    rng = np.random.default_rng(seed)
    for layer in flow.keras_layers:
        for weight in layer.trainable_weights:
            if not weight.path.endswith("kernel"):
                weight.assign(weight + 0.3 * rng.normal(size=weight.shape))
    return flow


# ------------------------------------------------------------------------------------------------
# Round trips and shapes


ROUND_TRIPS = {
    "8x8-plain": ((8, 8, 1), tiny()),
    "8x8-factor-out": ((8, 8, 1), tiny(factor_out=True, blocks_per_scale=(1, 1, 1))),
    "28x28-plain": ((28, 28, 1), tiny()),
    "28x28-factor-out": ((28, 28, 1), tiny(factor_out=True, blocks_per_scale=(1, 1, 1))),
    "8x8x2-squeeze-first-elu": (
        (8, 8, 2),
        tiny(squeeze_first=True, factor_out=True, activation="elu", fc_end_blocks=0),
    ),
}


@pytest.mark.parametrize(("shape", "config"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_and_latent_shapes(shape, config):
    flow = perturbed_flow(shape, config)
    size = math.prod(shape)
    assert flow.latent_size == size
    assert sum(math.prod(s) for s in flow.latent_shapes) == size
    assert len(flow.latent_shapes) == (len(config.blocks_per_scale) if config.factor_out else 1)
    assert tuple(flow.inverse_event_shape(shape)) == (size,)
    assert tuple(flow.forward_event_shape([size])) == shape

    x = uniform_images((3, *shape), seed=1)
    z = flow.inverse(tf.identity(x))
    assert z.shape == (3, size)
    # The fixed-point tolerance in float64 is 1e-12 per block; 1e-8 leaves room for the logit.
    np.testing.assert_allclose(flow.forward(tf.identity(z)), x, atol=1e-8)

    base = tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), [size])
    distribution = tfd.TransformedDistribution(base, flow)
    assert tuple(distribution.event_shape) == shape
    samples = distribution.sample(2, seed=[4, 5])  # inverts every block
    assert samples.shape == (2, *shape)
    margin = config.logit_alpha / (1 - 2 * config.logit_alpha)  # the logit's range
    assert np.all((samples.numpy() >= -margin) & (samples.numpy() <= 1 + margin))
    # Sampling is the forward map of base draws. (Inverting the samples back to the latents is
    # ill-conditioned where the logistic saturates, so the round trip is checked from data.)
    latent = base.sample(2, seed=[4, 5])
    np.testing.assert_allclose(samples, flow.forward(tf.identity(latent)), atol=1e-12)
    log_p = distribution.log_prob(x)
    assert log_p.shape == (3,)
    assert_finite(log_p)


def test_factor_out_parts_are_the_channel_halves_in_documented_order():
    # Without blocks or logit the flow is squeezes and factor-outs only, so the latent can be
    # written down: after scale 0's squeeze, channels 2:4 leave first, then the rest.
    config = tiny(actnorm=False, fc_end_blocks=0, logit_alpha=None, factor_out=True, **FAST)
    flow = MultiscaleResidualFlow((4, 4, 1), config, dtype="float64")
    for layer in flow.keras_layers:  # g = 0: identity blocks
        for weight in layer.trainable_weights:
            weight.assign(tf.zeros_like(weight))
    x = uniform_images((2, 4, 4, 1))
    squeezed = tf.nn.space_to_depth(x, 2).numpy()
    expected = np.concatenate(
        [squeezed[..., 2:].reshape(2, -1), squeezed[..., :2].reshape(2, -1)], axis=1
    )
    np.testing.assert_array_equal(flow.inverse(x), expected)


def test_extra_batch_dimensions():
    flow = perturbed_flow((4, 4, 1), tiny(log_det="exact"))
    x = uniform_images((2, 3, 4, 4, 1))
    z = flow.inverse(tf.identity(x))
    assert z.shape == (2, 3, 16)
    np.testing.assert_allclose(z[1], flow.inverse(tf.identity(x[1])), atol=1e-12)
    ildj = flow.inverse_log_det_jacobian(tf.identity(x), event_ndims=3)
    assert ildj.shape == (2, 3)
    np.testing.assert_allclose(flow.forward(z), x, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Log-determinants


BRUTE_FORCE = {
    "plain": tiny(log_det="exact", **FAST),
    "factor-out": tiny(log_det="exact", factor_out=True, **FAST),
    "squeeze-first": tiny(log_det="exact", squeeze_first=True, factor_out=True, **FAST),
    "no-logit-no-actnorm": tiny(log_det="exact", logit_alpha=None, actnorm=False, **FAST),
}


@pytest.mark.parametrize("config", BRUTE_FORCE.values(), ids=BRUTE_FORCE.keys())
def test_exact_log_det_matches_brute_force_jacobian(config):
    flow = perturbed_flow((4, 4, 1), config)
    x = uniform_images((3, 4, 4, 1), seed=2)
    expected = brute_force_inverse_log_det(flow, x, 3)  # slogdet of the 16 x 16 Jacobian
    ildj = flow.inverse_log_det_jacobian(tf.identity(x), event_ndims=3)
    # Both are float64 sums of about 10 terms of size ~10: 1e-9 is round-off, not estimation.
    np.testing.assert_allclose(ildj, expected, atol=1e-9)
    # Evaluation mode: every event here has at most 16 dimensions, so "auto" is exact too.
    with training_mode(False):
        np.testing.assert_allclose(
            flow.inverse_log_det_jacobian(tf.identity(x), event_ndims=3), expected, atol=1e-9
        )
    # TFP's convention: fldj(z) = -ildj(forward(z)).
    z = flow.inverse(tf.identity(x))
    np.testing.assert_allclose(
        flow.forward_log_det_jacobian(tf.identity(z), event_ndims=1), -expected, atol=1e-8
    )
    # And the density is the base density of the latent plus the log-det.
    base = tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), [16])
    log_p = tfd.TransformedDistribution(base, flow).log_prob(x)
    np.testing.assert_allclose(log_p, base.log_prob(z) + expected, atol=1e-9)


def test_seeded_estimate_is_reproducible_and_seeds_differ_per_block():
    flow = perturbed_flow((8, 8, 1), tiny(**FAST))
    x = uniform_images((4, 8, 8, 1), seed=6)

    def estimate(seed):
        return flow.inverse_log_det_jacobian(tf.identity(x), event_ndims=3, seed=seed).numpy()

    np.testing.assert_array_equal(estimate([1, 2]), estimate([1, 2]))
    assert not np.allclose(estimate([1, 2]), estimate([1, 3]))
    assert not np.allclose(estimate(None), estimate(None))


def test_blocks_get_the_configured_estimator():
    config = tiny(num_exact_terms=5, term_distribution="geometric", geometric_p=0.4, **FAST)
    flow = MultiscaleResidualFlow((8, 8, 1), config)
    assert len(flow.blocks) == 3  # 1 + 1 convolutional, 1 fully connected
    assert [b.parameters["event_ndims"] for b in flow.blocks] == [3, 3, 1]
    for block in flow.blocks:
        assert block.config.log_det == "unbiased"
        assert block.config.estimator_options("unbiased") == {
            "term_distribution": "geometric",
            "poisson_rate": 2.0,
            "geometric_p": 0.4,
            "num_exact_terms": 5,
            "probe": "gaussian",
            "num_probes": 1,
            "neumann_gradient": True,
            "backward_slice_size": None,
        }


# ------------------------------------------------------------------------------------------------
# Bits per dimension with a known answer


@pytest.mark.parametrize("num_levels", [17, 256])
@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_bits_per_dim_of_the_logistic_identity_flow(num_levels, alpha):
    # Blocks with g = 0 and no ActNorm leave logit(alpha + (1 - 2 alpha) x) (permuted). Under a
    # standard logistic base, the density of x in [0, 1)^D is then exactly (1 - 2 alpha)^D
    # (d/dx of the logistic CDF at the logit cancels the logit's Jacobian), so dequantised data
    # of k levels have bits/dim = log2(k) - log2(1 - 2 alpha), whatever the data.
    shape = (8, 8, 1)
    flow = MultiscaleResidualFlow(shape, tiny(actnorm=False, logit_alpha=alpha, **FAST))
    for variable in flow.trainable_variables:
        variable.assign(tf.zeros_like(variable))
    base = tfd.Sample(tfd.Logistic(0.0, 1.0), [64])
    model = FlowModel(flow, shape, base=base, loss_unit="bits_per_dim", num_levels=num_levels)
    rng = np.random.default_rng(7)
    levels = rng.integers(0, num_levels, size=(16, *shape))
    x = ((levels + rng.uniform(size=levels.shape)) / num_levels).astype(np.float32)
    expected = math.log2(num_levels) - math.log2(1 - 2 * alpha)
    # float32: the logit and its log-det lose ~1e-6 relative per pixel; 1e-4 bits is far from
    # any mistake in the offset (log2(k) >= 4 bits) or in the logit's log-det.
    np.testing.assert_allclose(model(x, training=False), expected, atol=1e-4)
    np.testing.assert_allclose(model(x, training=True), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Keras: variables, fit, saving


def test_keras_layers_hold_every_variable_in_a_deterministic_order():
    flow = MultiscaleResidualFlow((8, 8, 1), tiny(factor_out=True, **FAST))
    weights = [w for layer in flow.keras_layers for w in layer.trainable_weights]
    assert {id(v) for v in flow.trainable_variables} == {id(w.value) for w in weights}
    again = MultiscaleResidualFlow((8, 8, 1), tiny(factor_out=True, **FAST))
    shapes = [[tuple(w.shape) for w in layer.weights] for layer in flow.keras_layers]
    assert shapes == [[tuple(w.shape) for w in layer.weights] for layer in again.keras_layers]
    assert all(isinstance(b, ResidualBlock) for b in flow.blocks)
    # 1 initial ActNorm + one after each of the 3 blocks.
    assert len(flow.actnorms) == 4


def test_learnable_norm_orders_are_tied_within_each_g():
    flow = MultiscaleResidualFlow((8, 8, 1), tiny(learnable_norm_orders=True, **FAST))
    weights = [w for layer in flow.keras_layers for w in layer.trainable_weights]
    logits = [w for w in weights if w.path.endswith("/logit")]
    assert len(logits) == 2 * 3 + 1 * 2  # two 3-conv blocks, one 2-layer fc block
    for block in flow.blocks:
        layers = lipschitz.spectral_layers(block.keras_layers)
        assert all(
            a.codomain is b.domain for a, b in zip(layers, layers[1:] + layers[:1], strict=True)
        )


@pytest.mark.parametrize("learnable_norm_orders", [False, True])
def test_fit_then_save_and_load_gives_the_same_log_prob(tmp_path, learnable_norm_orders):
    # 4x4x1 images: every event is at most 16-dimensional, so evaluation is exact and the
    # comparison deterministic.
    keras.utils.set_random_seed(0)
    shape = (4, 4, 1)
    model = FlowModel(
        MultiscaleResidualFlow(
            shape, tiny(factor_out=True, learnable_norm_orders=learnable_norm_orders)
        ),
        shape,
        loss_unit="bits_per_dim",
        num_levels=256,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = uniform_images((64, *shape), seed=8, dtype=np.float32).numpy()
    model.build((None, *shape))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    for w, old in zip(model.trainable_weights, before, strict=True):
        assert not np.allclose(w.numpy(), old), f"{w.path} did not move"
    path = tmp_path / "image_flow.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.bijector, MultiscaleResidualFlow)
    assert loaded.bijector.config == model.bijector.config
    np.testing.assert_allclose(loaded.log_prob(x[:8]), model.log_prob(x[:8]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input and configuration


def test_an_empty_batch_of_images_is_refused_with_a_clear_error():
    # TensorFlow's graph optimiser breaks the traced blocks on zero-size inputs (an obscure
    # InvalidArgumentError from inside a fused op); a static empty batch is refused up front.
    flow = MultiscaleResidualFlow((8, 8, 1), tiny(**FAST))
    images, latents = tf.zeros([0, 8, 8, 1]), tf.zeros([0, flow.latent_size])
    for call, t, what in [
        (flow.inverse, images, "images"),
        (lambda t: flow.inverse_log_det_jacobian(t, event_ndims=3), images, "images"),
        (flow.forward, latents, "latents"),
    ]:
        with pytest.raises(ValueError, match=rf"{what} must be a non-empty batch; got shape"):
            call(t)
    assert flow.inverse(tf.zeros([1, 8, 8, 1])).shape == (1, flow.latent_size)


@pytest.mark.parametrize(
    ("shape", "config", "divisor"),
    [
        ((28, 28, 1), tiny(blocks_per_scale=(1, 1, 1, 1)), 8),
        ((12, 10, 3), tiny(blocks_per_scale=(1, 1), squeeze_first=True), 4),
        ((9, 8, 1), tiny(), 2),
    ],
)
def test_image_size_not_divisible_by_the_squeezes_names_the_shape(shape, config, divisor):
    message = rf"Images of shape \({shape[0]}, {shape[1]}, {shape[2]}\) cannot be squeezed"
    with pytest.raises(ValueError, match=message + rf".*divisible by {divisor}\."):
        MultiscaleResidualFlow(shape, config)


def test_scale_shapes_follow_the_squeezes():
    assert scale_shapes((28, 28, 1), tiny(blocks_per_scale=(1, 1, 1))) == [
        (28, 28, 1),
        (14, 14, 4),
        (7, 7, 16),
    ]
    assert scale_shapes((8, 8, 2), tiny(squeeze_first=True, factor_out=True)) == [
        (4, 4, 8),
        (2, 2, 16),
    ]


def test_wrong_image_shape_at_call_time_names_it():
    flow = MultiscaleResidualFlow((8, 8, 1), tiny(**FAST))
    with pytest.raises(ValueError, match=r"images must have shape \[\.\.\., 8, 8, 1\]; got shape"):
        flow.inverse(tf.zeros((2, 8, 4, 1)))
    with pytest.raises(ValueError, match=r"latents must have shape \[\.\.\., 64\]"):
        flow.forward(tf.zeros((2, 63)))
    with pytest.raises(ValueError, match=r"built for images of shape \[8, 8, 1\]"):
        flow.inverse_event_shape([4, 4, 1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blocks_per_scale", ()),
        ("blocks_per_scale", (2, 0)),
        ("blocks_per_scale", "16-16-16"),
        ("hidden_channels", 0),
        ("kernel_sizes", (3, 2, 3)),
        ("lipschitz_constant", 1.0),
        ("activation", "relu"),
        ("factor_out", 1),
        ("fc_end_blocks", -1),
        ("fc_hidden_units", (0,)),
        ("logit_alpha", 0.5),
        ("num_levels", 1),
        ("initial_power_iterations", -1),
        ("learnable_norm_orders", 1),
    ],
)
def test_bad_config_names_the_field_and_value(field, value):
    message = rf"ImageFlowConfig\.{field} must be .*; got {re.escape(repr(value))}\."
    with pytest.raises(ValueError, match=message):
        ImageFlowConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("log_det", "magic"),
        ("num_exact_terms", 1.5),
        ("term_distribution", "uniform"),
        ("poisson_rate", 0.0),
        ("geometric_p", 1.0),
        ("probe", "sphere"),
        ("solver", "newton"),
        ("atol", -1.0),
        ("on_nonconvergence", "ignore"),
    ],
)
def test_bad_block_config_names_the_field_and_value(field, value):
    message = rf"BlockConfig\.{field} must be .*; got {re.escape(repr(value))}\."
    with pytest.raises(ValueError, match=message):
        with_fields(ImageFlowConfig(), **{field: value})


def test_image_flows_take_every_registered_estimator():
    for name in logdet.LOG_DET_NAMES:  # the truncated series too, for the ablations
        assert ImageFlowConfig(block=BlockConfig(log_det=name)).block.log_det == name


def test_learnable_norm_orders_refuse_clipswish():
    with pytest.raises(ValueError, match="learnable_norm_orders must be False with clipswish"):
        ImageFlowConfig(activation="clipswish", learnable_norm_orders=True)


def test_config_round_trips_through_a_dict():
    config = tiny(factor_out=True, logit_alpha=None)
    assert ImageFlowConfig(**to_dict(config)) == config
    assert isinstance(to_dict(config)["blocks_per_scale"], list)
    assert isinstance(to_dict(config)["block"], dict)
    with pytest.raises(ValueError, match="config must be an ImageFlowConfig"):
        MultiscaleResidualFlow((8, 8, 1), {"hidden_channels": 4})
