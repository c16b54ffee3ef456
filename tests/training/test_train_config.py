"""Tests of the training recipe: configuration, optimizer, the non-finite guard, pictures."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.models.model import FlowModel
from tfp_resflow.training import artifacts, evaluation, train_config
from tfp_resflow.training.optimizer import GroupedAdam


def compiled_toy_model(config=None, total_steps=100):
    config = config or train_config.TrainConfig(dataset="8gaussians", preset="toy", warmup_steps=10)
    keras.utils.set_random_seed(0)
    flow = ResidualFlowBijector(num_blocks=2, hidden_units=(8,), log_det="exact")
    model = FlowModel(flow, event_shape=[2])
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    model.initialize(x)
    model.compile(optimizer=train_config.make_optimizer(config, total_steps))
    model.optimizer.build(model.trainable_variables)
    return model, x


def test_learning_rate_warms_up_linearly_then_stays_constant_or_decays():
    for schedule, end in (("constant", 1e-3), ("cosine", 0.0)):
        config = train_config.TrainConfig(learning_rate=1e-3, warmup_steps=10, schedule=schedule)
        rate = train_config.make_schedule(config, total_steps=110)
        np.testing.assert_allclose(float(rate(0)), 0.0, atol=1e-12)
        np.testing.assert_allclose(float(rate(5)), 0.5e-3, rtol=1e-6)
        np.testing.assert_allclose(float(rate(10)), 1e-3, rtol=1e-6)
        np.testing.assert_allclose(float(rate(110)), end, atol=1e-9)


def test_optimizer_is_adam_with_the_authors_settings():
    config = train_config.TrainConfig(ema_momentum=0.999)
    adam = train_config.make_optimizer(config, total_steps=100)
    assert isinstance(adam, GroupedAdam)
    assert isinstance(adam, keras.optimizers.Adam)
    assert adam.beta_2 == 0.99
    assert adam.global_clipnorm == 1.0
    assert adam.use_ema
    assert adam.ema_momentum == 0.999
    assert adam.skip_nonfinite  # one replica: the optimizer's own guard
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        distributed = train_config.make_optimizer(config, total_steps=100)
    assert isinstance(distributed, keras.optimizers.LossScaleOptimizer)  # Keras' guard
    assert isinstance(distributed.inner_optimizer, GroupedAdam)
    assert not distributed.inner_optimizer.skip_nonfinite


def test_a_batch_with_nan_does_not_change_the_weights():
    model, x = compiled_toy_model()
    model.train_on_batch(x)  # one good step first, so the optimizer state is non-trivial
    before = [w.numpy().copy() for w in model.weights]
    bad = x.copy()
    bad[3, 1] = np.nan
    model.train_on_batch(bad)
    trainable = {id(w) for w in model.trainable_weights}
    for w, old in zip(model.weights, before, strict=True):
        if id(w) in trainable:
            np.testing.assert_array_equal(w.numpy(), old, err_msg=w.path)
    model.train_on_batch(x)  # and training goes on
    assert any(
        not np.array_equal(w.numpy(), old)
        for w, old in zip(model.weights, before, strict=True)
        if id(w) in trainable
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be a positive integer; got 0"),
        ("batch_size", -4, "batch_size must be a positive integer; got -4"),
        ("learning_rate", 0.0, "learning_rate must be a number > 0; got 0.0"),
        ("schedule", "linear", "schedule must be one of .* got 'linear'"),
        ("strategy", "horovod", "strategy must be one of .* got 'horovod'"),
        ("ema_momentum", 1.0, "ema_momentum must be a number in \\[0, 1\\); got 1.0"),
        ("steps_per_epoch", -1, "steps_per_epoch must be an integer >= 0; got -1"),
    ],
)
def test_bad_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        train_config.TrainConfig(**{field: value})


def test_every_field_has_its_flag_help():
    fields = [field.name for field in dataclasses.fields(train_config.TrainConfig)]
    assert list(train_config.FLAG_HELP) == fields


def test_notebook_names_stay_importable_from_training():
    assert train_config.ema_weights is evaluation.ema_weights
    assert train_config.evaluate_loss is evaluation.evaluate_loss


def test_config_round_trips_through_a_dict():
    config = train_config.TrainConfig(dataset="moons", epochs=3)
    assert train_config.TrainConfig(**dataclasses.asdict(config)) == config


def test_image_grid_tiles_images_with_borders():
    images = np.zeros((5, 2, 3, 1))
    images[1] = 1.0
    grid = artifacts.image_grid(images, columns=3, scale=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (2 * 3 + 1), 2 * (3 * 4 + 1), 1)
    # image 1 (white) sits in row 0, column 1, after the 1-pixel border (scaled by 2).
    assert np.all(grid[2:6, 2 * 5 : 2 * 8] == 255)
    assert np.all(grid[2:6, 2:8] == 0)


def test_density_panels_show_data_density_and_samples():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2000, 2)) * 0.3 + [2.0, 0.0]

    def log_prob(points):  # the data's own density
        return -0.5 * np.sum(((points - [2.0, 0.0]) / 0.3) ** 2, axis=1)

    image = artifacts.density_panels(data, log_prob, data, bins=32)
    assert image.shape == (32, 3 * 32 + 2)
    data_panel, density_panel = image[:, :32], image[:, 33:65]
    # Mass sits right of centre (x = 2) in both panels.
    for panel in (data_panel, density_panel):
        assert panel[:, 16:].sum() > 10 * panel[:, :16].sum()
