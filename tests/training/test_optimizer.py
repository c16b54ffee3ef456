"""Tests of GroupedAdam: Keras' Adam (with clipping and EMA), updated by groups of variables."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.training.optimizer import GroupedAdam

SHAPES = [(3, 4), (4,), (), (3, 4), (), (4,), (2, 2, 1), ()]


def make_variables(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape), dtype="float64") for shape in SHAPES]


def gradients(step, variables, scale=1.0):
    """Deterministic, step-dependent gradients (large enough for the clipping to act)."""
    return [
        tf.constant(scale * np.sin(np.arange(np.prod(v.shape) or 1) + step).reshape(v.shape))
        for v in variables
    ]


OPTIONS = {
    "plain": {},
    "clip-ema": {"global_clipnorm": 1.0, "use_ema": True, "ema_momentum": 0.9},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.CosineDecay(
            0.0, 100, warmup_target=0.05, warmup_steps=3
        ),
        "use_ema": True,
    },
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_grouped_adam_follows_keras_adam(name):
    options = {"learning_rate": 0.05, "beta_2": 0.99, **OPTIONS[name]}
    reference, grouped = make_variables(), make_variables()
    keras_adam = keras.optimizers.Adam(**options)
    ours = GroupedAdam(**options)
    for step in range(6):
        keras_adam.apply_gradients(zip(gradients(step, reference, 3.0), reference, strict=True))
        ours.apply_gradients(zip(gradients(step, grouped, 3.0), grouped, strict=True))
    for a, b in zip(grouped, reference, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
    for a, b in zip(ours.variables, keras_adam.variables, strict=True):  # moments, EMA, steps
        role = a.path.split("/")[-1].rsplit("_", 1)[-1]  # iteration, momentum, velocity, ...
        assert role == b.path.split("/")[-1].rsplit("_", 1)[-1]
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
    if ours.use_ema:
        ours.finalize_variable_values(grouped)
        keras_adam.finalize_variable_values(reference)
        for a, b in zip(grouped, reference, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)


def test_a_non_finite_step_is_skipped_entirely():
    variables = make_variables()
    optimizer = GroupedAdam(0.05, global_clipnorm=1.0, use_ema=True, skip_nonfinite=True)
    optimizer.apply_gradients(zip(gradients(0, variables), variables, strict=True))
    state = [v.numpy().copy() for v in variables + optimizer.variables]
    bad = gradients(1, variables)
    bad[2] = tf.constant(np.inf, tf.float64)
    optimizer.apply_gradients(zip(bad, variables, strict=True))
    for v, old in zip(variables + optimizer.variables, state, strict=True):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)  # iterations too
    optimizer.apply_gradients(zip(gradients(1, variables), variables, strict=True))
    assert int(optimizer.iterations.numpy()) == 2
    assert not np.array_equal(variables[0].numpy(), state[0])


def test_without_the_guard_a_non_finite_step_is_applied_as_keras_does():
    variables = make_variables()
    optimizer = GroupedAdam(0.05)
    bad = gradients(0, variables)
    bad[0] = tf.fill(bad[0].shape, tf.constant(np.nan, tf.float64))
    optimizer.apply_gradients(zip(bad, variables, strict=True))
    assert np.isnan(variables[0].numpy()).all()


def test_per_variable_options_use_keras_path_and_reject_the_guard():
    reference, ours = make_variables(), make_variables()
    keras_adam = keras.optimizers.Adam(0.05, weight_decay=0.1)
    grouped = GroupedAdam(0.05, weight_decay=0.1)
    for step in range(3):
        keras_adam.apply_gradients(zip(gradients(step, reference), reference, strict=True))
        grouped.apply_gradients(zip(gradients(step, ours), ours, strict=True))
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    guarded = GroupedAdam(0.05, weight_decay=0.1, skip_nonfinite=True)
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        guarded.apply_gradients(zip(gradients(0, ours), ours, strict=True))


def test_grouped_graph_is_a_fraction_of_keras_graph():
    variables = [keras.Variable(np.zeros(shape)) for shape in SHAPES * 10]
    sizes = {}
    for name, optimizer in (
        ("keras", keras.optimizers.Adam(1e-3, global_clipnorm=1.0, use_ema=True)),
        ("grouped", GroupedAdam(1e-3, global_clipnorm=1.0, use_ema=True, skip_nonfinite=True)),
    ):
        optimizer.build(variables)
        step = tf.function(
            lambda opt=optimizer: opt.apply_gradients(
                zip([tf.ones_like(v) for v in variables], variables, strict=True)
            )
        )
        graph = step.get_concrete_function().graph
        functions = graph.as_graph_def().library.function
        sizes[name] = len(graph.get_operations()) + sum(len(f.node_def) for f in functions)
    assert sizes["grouped"] < sizes["keras"] / 3, sizes


def test_config_round_trip_and_bad_argument():
    optimizer = GroupedAdam(0.01, beta_2=0.99, skip_nonfinite=True)
    clone = GroupedAdam.from_config(optimizer.get_config())
    assert clone.skip_nonfinite
    assert clone.beta_2 == 0.99
    with pytest.raises(ValueError, match="skip_nonfinite must be a bool"):
        GroupedAdam(0.01, skip_nonfinite="yes")
