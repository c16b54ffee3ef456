"""Tests of FlowModel: Keras fit, density quality on 2-D toys, saving, export, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import stats

from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.layers import lipschitz
from tfp_resflow.models.model import SAMPLE_SEED_SALT, FlowModel

tfb, tfd = tfp.bijectors, tfp.distributions


def eight_gaussians(n, seed):
    """Mixture of 8 isotropic Gaussians (std 0.2) on the circle of radius 2."""
    rng = np.random.default_rng(seed)
    angles = rng.integers(0, 8, n) * np.pi / 4
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centers + 0.2 * rng.normal(size=(n, 2))).astype(np.float32)


def two_spirals(n, seed):
    """Two interleaved spirals with Gaussian noise (std 0.1), as in the FFJORD toy sets."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(size=n)) * 3 * np.pi
    sign = np.where(rng.uniform(size=n) < 0.5, 1.0, -1.0)
    points = sign[:, None] * np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 3.0
    return (points + 0.1 * rng.normal(size=(n, 2))).astype(np.float32)


def gaussian_fit_nll(train, test):
    """Test NLL (nats) of the best Gaussian fit to the training data (its moments)."""
    mean, cov = train.mean(axis=0), np.cov(train.T)
    return float(-stats.multivariate_normal(mean, cov).logpdf(test).mean())


def small_model(**kwargs):
    options = dict(num_blocks=4, hidden_units=(64, 64))
    return FlowModel(ResidualFlowBijector(**{**options, **kwargs}), event_shape=[2])


@pytest.mark.parametrize("learnable_norm_orders", [False, True])
def test_fit_moves_every_trainable_weight_and_runs_power_iterations(learnable_norm_orders):
    model = small_model(
        num_blocks=2, hidden_units=(8,), learnable_norm_orders=learnable_norm_orders
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = eight_gaussians(256, seed=0)
    model.build((None, 2))
    before = [w.numpy().copy() for w in model.trainable_weights]
    spectral = lipschitz.spectral_layers(model.flow_layers)
    vectors_before = [w.numpy().copy() for layer in spectral for w in layer.non_trainable_weights]
    model.fit(x, batch_size=64, epochs=1, verbose=0)
    names = [w.path for w in model.trainable_weights]
    assert sum(name.endswith("/logit") for name in names) == 2 * 2 * learnable_norm_orders
    assert len(names) == len({id(v) for v in model.bijector.trainable_variables})
    for name, old, new in zip(names, before, model.trainable_weights, strict=True):
        assert not np.allclose(old, new.numpy()), f"{name} did not move"
    vectors_after = [w.numpy() for layer in spectral for w in layer.non_trainable_weights]
    moved = [not np.allclose(a, b) for a, b in zip(vectors_before, vectors_after, strict=True)]
    assert any(moved), "no power-iteration state changed during fit"


# (data, margin in nats below the best Gaussian's test NLL). An affine flow (ActNorm alone, or
# any linear map) can at best match the moment-matched Gaussian, so beating it shows that the
# residual blocks learned non-linear structure. Both sets are far from Gaussian (8 Gaussians:
# about 1.7 nats of entropy against 3.55 for the Gaussian fit; 2 spirals: about 2.5 against
# 3.72), so the margins are a small part of what a converged flow gains. Measured with these
# seeds on 2 CPU cores: 8 Gaussians 2.0 nats and 2 spirals 0.22 nats below the Gaussian
# (spirals need thousands of steps; this fit has 400).
TOY_SETS = {"8gaussians": (eight_gaussians, 0.5), "2spirals": (two_spirals, 0.15)}


@pytest.mark.slow
@pytest.mark.parametrize(("make_data", "margin"), TOY_SETS.values(), ids=TOY_SETS.keys())
def test_short_fit_beats_the_best_gaussian_by_a_margin(make_data, margin):
    keras.utils.set_random_seed(0)
    train, test = make_data(4096, seed=1), make_data(2048, seed=2)
    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(train, batch_size=256, epochs=25, verbose=0)
    model.update_lipschitz(atol=1e-4, rtol=1e-4)
    nll = float(tf.reduce_mean(model(test, training=False)))  # exact log-dets for 2-D events
    baseline = gaussian_fit_nll(train, test)
    print(f"test NLL {nll:.3f} nats; best Gaussian {baseline:.3f}")
    assert nll < baseline - margin, (nll, baseline)


@pytest.mark.parametrize(
    ("num_levels", "offset_bits"), [(None, 0.0), (256, 8.0), (17, np.log2(17))]
)
def test_bits_per_dim_unit(num_levels, offset_bits):
    model = small_model(num_blocks=1, hidden_units=(8,))
    model_bpd = FlowModel(
        model.bijector, event_shape=[2], loss_unit="bits_per_dim", num_levels=num_levels
    )
    x = eight_gaussians(16, seed=3)
    nats = model(x, training=False).numpy()
    bits = model_bpd(x, training=False).numpy()
    np.testing.assert_allclose(bits, nats / (2 * np.log(2.0)) + offset_bits, rtol=1e-6)


@pytest.mark.parametrize("learnable_norm_orders", [False, True])
def test_save_and_load_keras_file_gives_the_same_exact_log_prob(tmp_path, learnable_norm_orders):
    model = small_model(
        num_blocks=2, hidden_units=(16,), learnable_norm_orders=learnable_norm_orders
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = eight_gaussians(512, seed=4)
    model.fit(x, batch_size=128, epochs=1, verbose=0)
    path = tmp_path / "flow.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, FlowModel)
    test = eight_gaussians(32, seed=5)
    np.testing.assert_allclose(loaded.log_prob(test), model.log_prob(test), rtol=1e-6)
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for block in loaded.bijector.blocks:  # rebuilt from the flow's config: ties included
        first, last = lipschitz.spectral_layers(block.keras_layers)
        if learnable_norm_orders:
            assert first.codomain is last.domain
            assert last.codomain is first.domain
        else:
            assert (first.domain, first.codomain, last.codomain) == (2.0, 2.0, 2.0)


def test_learnable_orders_get_their_gradient_in_training_and_the_loss_value_is_the_nll():
    model = small_model(
        num_blocks=2, hidden_units=(8,), learnable_norm_orders=True, log_det="exact"
    )
    model.build((None, 2))
    x = eight_gaussians(64, seed=6)
    logits = [w for w in model.trainable_weights if w.path.endswith("/logit")]
    others = [w for w in model.trainable_weights if not w.path.endswith("/logit")]
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x, training=True)
        train_loss = model.compute_loss(y_pred=y_pred, training=True)
        eval_loss = model.compute_loss(y_pred=y_pred, training=False)
        order_loss = lipschitz.norm_order_loss(model.flow_layers)
    assert float(train_loss) == float(eval_loss)  # the added term is zero in value
    # The likelihood does not reach the orders (the blocks' custom gradients give zeros).
    assert all(g is None or float(g) == 0.0 for g in tape.gradient(eval_loss, logits))
    for got, want in zip(
        tape.gradient(train_loss, logits), tape.gradient(order_loss, logits), strict=True
    ):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    for got, want in zip(
        tape.gradient(train_loss, others), tape.gradient(eval_loss, others), strict=True
    ):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_export_has_log_prob_and_sample_endpoints(tmp_path):
    model = small_model(num_blocks=1, hidden_units=(8,))
    model.build((None, 2))
    model.export(str(tmp_path / "saved"))
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    x = eight_gaussians(8, seed=6)
    np.testing.assert_allclose(reloaded.log_prob(tf.constant(x)), model.log_prob(x), rtol=1e-5)
    samples = reloaded.sample(tf.constant(5))
    assert samples.shape == (5, 2)
    assert np.all(np.isfinite(samples))


def test_wraps_any_transformed_distribution_and_trains_its_weights():
    flow = ResidualFlowBijector(num_blocks=1, hidden_units=(8,))
    shift = tfb.Shift([1.0, -1.0])
    distribution = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(scale_diag=[2.0, 0.5]),
        tfb.Chain([shift, tfb.Invert(tfb.Invert(flow))]),
    )
    model = FlowModel.from_distribution(distribution)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(eight_gaussians(128, seed=7), batch_size=64, epochs=1, verbose=0)
    assert len(model.trainable_weights) == len(flow.trainable_variables) > 0
    with pytest.raises(NotImplementedError, match="custom base distribution"):
        model.get_config()


def test_sample_and_log_prob_shapes():
    model = small_model(num_blocks=1, hidden_units=(8,))
    samples = model.sample(7, seed=[1, 2])
    assert samples.shape == (7, 2)
    assert model.log_prob(samples).shape == (7,)


def test_sampling_is_traced_once_per_size_and_equals_the_eager_walk():
    keras.utils.set_random_seed(3)
    model = small_model(num_blocks=2, hidden_units=(8,))
    first = model.sample(16, seed=[1, 2])
    for seed in (None, 7, [3, 4], tf.constant([5, 6])):
        assert model.sample(16, seed=seed).shape == (16, 2)
    assert model._traced_sample.experimental_get_tracing_count() == 1
    model.sample(5, seed=[1, 2])  # another size: its own trace
    assert model._traced_sample.experimental_get_tracing_count() == 2
    # The same stateless seed gives the same draws, and TFP's eager walk gives them too.
    np.testing.assert_array_equal(model.sample(16, seed=[1, 2]), first)
    seed = tfp.random.sanitize_seed([1, 2], salt=SAMPLE_SEED_SALT)
    eager = model.distribution.sample(16, seed=seed)
    np.testing.assert_allclose(first, eager, atol=1e-5)
    assert not np.allclose(model.sample(16), model.sample(16))  # no seed: fresh draws


def test_certified_sampling_and_densities_refuse_an_uncertified_model():
    keras.utils.set_random_seed(4)
    model = small_model(num_blocks=2, hidden_units=(8,))
    model.build((None, 2))
    bounds = model.certify()
    assert len(bounds) == 2
    assert max(bounds) < 1.0
    assert model.sample(3, seed=[1, 2], certified=True).shape == (3, 2)
    # Break block 1: every power vector along its layer's weakest direction.
    for layer in lipschitz.spectral_layers(model.bijector.blocks[1].residual_fn):
        _, _, vt = np.linalg.svd(layer.kernel.numpy().T)
        layer.v.assign(vt[-1][None, :].astype(np.float32))
    with pytest.raises(ValueError, match=r"not certified invertible.*block 1: "):
        model.sample(3, seed=[1, 2], certified=True)
    with pytest.raises(ValueError, match="not certified invertible"):
        model.log_prob(np.zeros((2, 2), np.float32), certified=True)
    assert model.log_prob(np.zeros((2, 2), np.float32)).shape == (2,)  # default: no check
    with pytest.raises(RuntimeError, match="call it eagerly"):
        tf.function(model.certify)()


def test_wrong_event_shape_raises_a_clear_error():
    model = small_model(num_blocks=1, hidden_units=(8,))
    model.build((None, 2))
    with pytest.raises(ValueError, match=r"expects a batch of events of shape \[2\]"):
        model.log_prob(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"models events of shape \[2\]"):
        small_model().build((None, 5))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="loss_unit must be one of .* got 'bits'"):
        FlowModel(ResidualFlowBijector(), event_shape=[2], loss_unit="bits")
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2; got 1"):
        FlowModel(ResidualFlowBijector(), event_shape=[2], num_levels=1)
    with pytest.raises(ValueError, match="bijector must be a tfb.Bijector"):
        FlowModel(lambda x: x, event_shape=[2])
    with pytest.raises(ValueError, match="power_iterations must be a positive integer; got 0"):
        FlowModel(ResidualFlowBijector(), event_shape=[2], power_iterations=0)


def test_power_iterations_are_kept_in_the_config():
    model = FlowModel(ResidualFlowBijector(), event_shape=[2], power_iterations=3)
    assert model.get_config()["power_iterations"] == 3
    assert FlowModel.from_config(model.get_config()).power_iterations == 3


# ------------------------------------------------------------------------------------------------
# The joint pass inside FlowModel, tracing, XLA


@pytest.mark.parametrize("training", [True, False])
def test_log_prob_equals_the_transformed_distribution_for_a_seed(training):
    from tfp_resflow.bijectors.residual_block import training_mode

    model = small_model(num_blocks=2, hidden_units=(8,))
    x = eight_gaussians(16, seed=8)
    model.initialize(x)
    with training_mode(training):
        expected = model.distribution.log_prob(tf.identity(x), bijector_kwargs={"seed": [1, 2]})
    np.testing.assert_allclose(
        model.log_prob(x, training=training, seed=[1, 2]), expected, rtol=1e-6, atol=1e-6
    )


def test_a_training_step_is_traced_once(monkeypatch):
    traces = []
    original = FlowModel.train_step
    monkeypatch.setattr(
        FlowModel, "train_step", lambda self, data: traces.append(1) or original(self, data)
    )
    model = small_model(num_blocks=1, hidden_units=(8,))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # not built: make_train_function does
    x = eight_gaussians(32, seed=9)
    for _ in range(3):
        model.train_on_batch(x)
    assert len(traces) == 1  # the optimizer's variables exist before the step is traced


def test_an_image_flow_trains_under_xla():
    from tfp_resflow.bijectors.multiscale import image_flow
    from tfp_resflow.configs.presets import ImageFlowConfig

    keras.utils.set_random_seed(0)
    config = ImageFlowConfig(
        blocks_per_scale=(1, 1),
        hidden_channels=4,
        fc_end_blocks=1,
        fc_hidden_units=(8,),
        initial_power_iterations=5,
    )
    model = FlowModel(image_flow((4, 4, 1), config), (4, 4, 1), loss_unit="bits_per_dim")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    x = np.random.default_rng(0).uniform(size=(8, 4, 4, 1)).astype(np.float32)
    model.initialize(x)
    before = [w.numpy().copy() for w in model.trainable_weights]
    losses = [float(model.train_on_batch(x)) for _ in range(2)]
    assert model.jit_compile
    assert np.all(np.isfinite(losses))
    for old, weight in zip(before, model.trainable_weights, strict=True):
        assert not np.array_equal(old, weight.numpy()), weight.path


def test_the_design_card_distribution_saves_as_a_config(tmp_path):
    base = tfd.Sample(tfd.Normal(0.0, 1.0), sample_shape=[2])
    model = FlowModel.from_distribution(
        tfd.TransformedDistribution(base, ResidualFlowBijector(num_blocks=1, hidden_units=(8,)))
    )
    x = eight_gaussians(16, seed=10)
    model.initialize(x)
    model.save(tmp_path / "flow.keras")
    loaded = keras.models.load_model(tmp_path / "flow.keras")
    np.testing.assert_allclose(loaded.log_prob(x), model.log_prob(x), rtol=1e-6)
    shifted = tfd.Sample(tfd.Normal(1.0, 1.0), sample_shape=[2])  # not the standard normal
    custom = FlowModel.from_distribution(tfd.TransformedDistribution(shifted, model.bijector))
    with pytest.raises(NotImplementedError, match="custom base distribution"):
        custom.get_config()


def test_fit_traces_the_train_step_once_though_the_number_of_terms_varies():
    # The roulette draws a new number of series terms at every step inside the graph
    # (a tf.while_loop bound), so 20 steps must not retrace: one trace (Keras may add a second
    # for a last partial batch, which this data avoids).
    keras.utils.set_random_seed(0)
    flow = ResidualFlowBijector(num_blocks=2, hidden_units=(8,))
    model = FlowModel(flow, event_shape=[2])
    traces = []
    original = model.train_step

    def counted(data):
        traces.append(1)  # Python runs only while tracing
        return original(data)

    model.train_step = counted
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).normal(size=(20 * 16, 2)).astype(np.float32)
    history = model.fit(x, batch_size=16, epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 20
    assert np.isfinite(history.history["loss"][-1])
    assert len(traces) == 1


def test_a_model_with_nothing_to_train_refuses_to_fit():
    # A tfb.RealNVP whose network FlowModel cannot see: Keras alone would only warn.
    network = keras.Sequential([keras.layers.Dense(2)])
    network.build((None, 1))
    coupling = tfp.bijectors.RealNVP(
        num_masked=1,
        shift_and_log_scale_fn=lambda x, output_units, **kwargs: tf.split(network(x), 2, -1),
    )
    model = FlowModel(coupling, event_shape=[2])
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(ValueError, match="has no trainable weights"):
        model.fit(np.zeros((8, 2), np.float32), epochs=1, verbose=0)


# ------------------------------------------------------------------------------------------------
# Conditional models p(x | c)


def two_blobs(n, seed):
    """(x, c): class 0 around (2, 0), class 1 around (-2, 0) (std 0.3); c one-hot."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = np.stack([2.0 - 4.0 * labels, np.zeros(n)], axis=1) + 0.3 * rng.normal(size=(n, 2))
    return x.astype(np.float32), np.eye(2, dtype=np.float32)[labels]


def conditional_model(**kwargs):
    flow = ResidualFlowBijector(
        num_blocks=2, hidden_units=(16,), context_size=2, context_hidden_units=(8,), **kwargs
    )
    return FlowModel(flow, event_shape=[2], context_shape=[2])


def context_network_weights(model):
    return [w for w in model.trainable_weights if "context" in w.path]


@pytest.mark.parametrize("form", ["dataset", "arrays", "tuple"])
def test_a_conditional_model_fits_pairs_in_every_form(form):
    keras.utils.set_random_seed(0)
    model = conditional_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, c = two_blobs(128, seed=0)
    model.build((None, 2))
    before = [w.numpy().copy() for w in context_network_weights(model)]
    assert before  # the context networks are the model's weights
    if form == "dataset":
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, c)).batch(32), verbose=0)
    elif form == "arrays":
        history = model.fit(x, c, batch_size=32, verbose=0)
    else:
        history = model.fit((x, c), batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    for old, new in zip(before, context_network_weights(model), strict=True):
        assert not np.allclose(old, new.numpy()), new.path
    evaluated = model.evaluate(x, c, batch_size=64, verbose=0)
    assert np.isfinite(evaluated)


def test_a_conditional_model_learns_what_the_context_says():
    keras.utils.set_random_seed(1)
    model = conditional_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, c = two_blobs(1024, seed=1)
    model.fit(x, c, batch_size=128, epochs=4, verbose=0)
    test_x, test_c = two_blobs(256, seed=2)
    right = model.log_prob(test_x, context=test_c).numpy().mean()
    wrong = model.log_prob(test_x, context=1.0 - test_c).numpy().mean()
    assert right > wrong + 2.0, (right, wrong)
    # Samples follow their context: one for all, or one per sample.
    left = model.sample(64, seed=[1, 2], context=[0.0, 1.0]).numpy()
    assert left.shape == (64, 2)
    assert left[:, 0].mean() < -1.0
    per_sample = model.sample(64, seed=[3, 4], context=np.eye(2)[np.arange(64) % 2]).numpy()
    assert per_sample[0::2, 0].mean() > 1.0
    assert per_sample[1::2, 0].mean() < -1.0


def test_transformed_distribution_takes_the_context_as_bijector_kwargs():
    keras.utils.set_random_seed(2)
    model = conditional_model(log_det="exact")
    model.build((None, 2))
    x, c = two_blobs(6, seed=3)
    kwargs = {"conditional_input": c}
    np.testing.assert_allclose(
        model.distribution.log_prob(x, bijector_kwargs=kwargs),
        model.log_prob(x, context=c),
        rtol=1e-5,
    )
    samples = model.distribution.sample(6, seed=[5, 6], bijector_kwargs=kwargs)
    assert samples.shape == (6, 2)


def test_conditional_export_has_context_endpoints(tmp_path):
    keras.utils.set_random_seed(3)
    model = conditional_model()
    model.build((None, 2))
    model.export(str(tmp_path / "saved"))
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    x, c = two_blobs(8, seed=4)
    np.testing.assert_allclose(
        reloaded.log_prob(tf.constant(x), tf.constant(c)),
        model.log_prob(x, context=c),
        rtol=1e-5,
    )
    assert reloaded.sample(tf.constant(5), tf.constant([[1.0, 0.0]])).shape == (5, 2)


def test_context_mistakes_raise_clear_errors():
    model = conditional_model()
    x, c = two_blobs(4, seed=5)
    with pytest.raises(
        ValueError, match=r"models p\(x \| c\): pass context=c of shape \[batch, 2\]"
    ):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"takes contexts of shape \[batch, 2\] or \[2\]"):
        model.log_prob(x, context=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"its input is the pair \(x, c\)"):
        model(x)
    with pytest.raises(ValueError, match="takes no context"):
        small_model(num_blocks=1, hidden_units=(8,)).log_prob(x, context=c)
    with pytest.raises(ValueError, match=r"the bijector is conditional.*context_shape=\[K\]"):
        FlowModel(ResidualFlowBijector(context_size=2), event_shape=[2])
    with pytest.raises(ValueError, match="needs a conditional bijector"):
        FlowModel(ResidualFlowBijector(), event_shape=[2], context_shape=[2])
    with pytest.raises(ValueError, match=r"does not match the bijector's context_size \[2\]"):
        FlowModel(ResidualFlowBijector(context_size=2), event_shape=[2], context_shape=[3])
    with pytest.raises(ValueError, match=r"context_shape must be \[K\]"):
        FlowModel(ResidualFlowBijector(context_size=2), event_shape=[2], context_shape=[2, 1])
    with pytest.raises(ValueError, match="is unconditional"):
        ResidualFlowBijector(event_size=2).inverse(x, conditional_input=c)
