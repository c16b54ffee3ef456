"""Tests of joint generative and discriminative modelling (`tfp_resflow.models.hybrid`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from sklearn.datasets import load_digits

from tfp_resflow.bijectors import composite
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow
from tfp_resflow.configs import presets
from tfp_resflow.configs.config_fields import with_fields
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.core.modes import training_mode
from tfp_resflow.models.hybrid import ClassificationHead, HybridFlowModel, nll_weight_value

TINY = ImageFlowConfig(
    blocks_per_scale=(1, 1),
    hidden_channels=4,
    fc_end_blocks=0,
    fc_hidden_units=(8,),
    initial_power_iterations=5,
)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def digits(count=None):
    """The scikit-learn digits, dequantised to [0, 1) (float32) with their labels."""
    data = load_digits()
    noise = np.random.default_rng(0).uniform(size=data.images.shape)
    x = ((data.images + noise) / 17.0).astype(np.float32)[..., None]
    return x[:count], data.target[:count].astype(np.int32)


def images(batch, shape, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(size=(batch, *shape)), tf.float32)


@pytest.mark.parametrize(
    ("shape", "changes", "expected"),
    [
        ((8, 8, 1), {}, [(8, 8, 1), (4, 4, 4)]),  # each scale's whole activation
        ((8, 8, 1), {"factor_out": True}, [(4, 4, 2), (4, 4, 2)]),  # the part leaving, the rest
        ((8, 8, 2), {"factor_out": True, "squeeze_first": True}, [(2, 2, 16), (2, 2, 16)]),
    ],
)
def test_the_head_reads_the_output_of_every_scale(shape, changes, expected):
    flow = MultiscaleResidualFlow(shape, with_fields(TINY, **changes))
    x = images(3, shape)
    with training_mode(training=False):
        z, log_det, features = flow.inverse_log_det_and_features(x, seed=1)
        joint_z, joint_log_det = composite.inverse_and_log_det(flow, x, event_ndims=3, seed=1)
    assert [tuple(f.shape[1:]) for f in features] == expected
    assert flow.feature_shapes == expected  # known without a pass: the head is sized from it
    np.testing.assert_array_equal(z, joint_z)  # the same single pass
    np.testing.assert_array_equal(log_det, joint_log_det)
    # The last scale's features are the final tensor: the end of the latent.
    last = tf.reshape(features[-1], [3, -1])
    np.testing.assert_array_equal(z[:, -last.shape[1] :], last)
    if changes.get("factor_out"):  # the factored-out part is the start of the latent
        first = tf.reshape(features[0], [3, -1])
        np.testing.assert_array_equal(z[:, : first.shape[1]], first)


def test_a_vector_flow_gives_its_latent_to_a_dense_head():
    flow = ResidualFlowBijector(num_blocks=2, hidden_units=(8,), log_det="exact", event_size=3)
    z, _, features = flow.inverse_log_det_and_features(tf.ones([4, 3]))
    assert len(features) == 1
    assert flow.feature_shapes == [(3,)]
    np.testing.assert_array_equal(features[0], z)
    head = ClassificationHead(5)
    assert head(features).shape == (4, 5)
    assert len(head.trainable_variables) == 2  # the dense layer only


def hybrid_model(nll_weight, **changes):
    config = with_fields(presets.PRESETS["digits"], blocks_per_scale=(1, 1), fc_end_blocks=0)
    flow = MultiscaleResidualFlow((8, 8, 1), with_fields(config, **changes))
    model = HybridFlowModel(
        flow,
        (8, 8, 1),
        num_classes=10,
        nll_weight=nll_weight,
        loss_unit="bits_per_dim",
        num_levels=17,
        head_channels=16,
    )
    model.build((None, 8, 8, 1))
    return model


@pytest.mark.parametrize("nll_weight", [0.0, "1/D", 1.0])
def test_the_hybrid_loss_weighs_the_likelihood_and_reaches_flow_and_head(nll_weight):
    model = hybrid_model(nll_weight, log_det="exact")  # exact: a deterministic likelihood
    x, y = digits(16)
    model.initialize(x)
    with tf.GradientTape() as tape:
        outputs = model(x, training=True)
        loss = model.compute_loss(x, y, outputs, training=True)
    cross_entropy = keras.losses.sparse_categorical_crossentropy(
        y, outputs["logits"], from_logits=True
    )
    weight = nll_weight_value(nll_weight, 64)
    expected = np.mean(weight * -outputs["log_prob"].numpy() + cross_entropy.numpy())
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    gradients = tape.gradient(loss, model.trainable_variables)
    by_path = {v.path: g for v, g in zip(model.trainable_variables, gradients, strict=True)}
    head = [v.path for v in model.head.trainable_variables]
    flow_kernels = [
        v.path
        for v in [w for layer in model.flow_layers for w in layer.trainable_weights]
        if "kernel" in v.path
    ]
    assert len(head) == 2 * 4 + 2  # conv, ActNorm per scale; the dense layer
    assert flow_kernels
    for path in head + flow_kernels:  # the classifier's gradient reaches the flow even at 0
        assert by_path[path] is not None, path
        assert np.any(by_path[path].numpy() != 0), path


def test_a_short_run_classifies_the_digits_well_above_chance():
    model = hybrid_model("1/D")
    x, y = digits()
    model.initialize(x[:256])
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(x[:1500], y[:1500], batch_size=64, epochs=3, verbose=0)
    result = model.evaluate(x[1500:], y[1500:], batch_size=100, verbose=0, return_dict=True)
    assert result["accuracy"] > 0.4  # chance: 0.1
    assert np.isfinite(result["nll"])
    assert 0 < result["nll"] < 8  # bits/dim: below uniform noise's log2(17) = 4.09 is learned


def test_the_hybrid_model_round_trips_through_a_keras_file(tmp_path):
    model = hybrid_model(1.0)
    x, _ = digits(8)
    model.initialize(x)
    path = tmp_path / "hybrid.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, HybridFlowModel)
    assert (loaded.num_classes, loaded.nll_weight, loaded.task) == (10, 1.0, "hybrid")
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    expected = model.log_prob_and_logits(x, seed=3)
    for a, b in zip(loaded.log_prob_and_logits(x, seed=3), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_named():
    flow = ResidualFlowBijector(num_blocks=1, hidden_units=(4,), event_size=2)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2; got 1"):
        HybridFlowModel(flow, (2,), num_classes=1)
    with pytest.raises(ValueError, match="nll_weight must be a number >= 0; got -1"):
        HybridFlowModel(flow, (2,), num_classes=3, nll_weight=-1)
    with pytest.raises(ValueError, match="needs one of the package's flows"):
        HybridFlowModel(tfp.bijectors.Shift(1.0), (2,), num_classes=3)
    model = HybridFlowModel(flow, (2,), num_classes=3)
    model.compile(optimizer=keras.optimizers.Adam())
    with pytest.raises(ValueError, match=r"trains on \(x, label\) batches"):
        model.fit(np.zeros((4, 2), np.float32), epochs=1, verbose=0)


def test_a_conditional_flow_is_refused():
    conditional = ResidualFlowBijector(num_blocks=1, hidden_units=(4,), context_size=2)
    with pytest.raises(ValueError, match="takes no context_shape and no conditional flow"):
        HybridFlowModel(conditional, (2,), num_classes=3, context_shape=[2])
    with pytest.raises(ValueError, match="takes no context_shape and no conditional flow"):
        HybridFlowModel(conditional, (2,), num_classes=3)
