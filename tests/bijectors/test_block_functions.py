"""Tests of the traced, shared passes of residual blocks (`block_functions`)."""

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.bijectors import block_functions
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.configs.presets import ImageFlowConfig
from tfp_resflow.layers.lipschitz import SpectralDense
from tfp_resflow.layers.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.models.model import FlowModel


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def mlp(hidden=(8,), **kwargs):
    return lipschitz_mlp(3, hidden, dtype="float64", initial_power_iterations=50, **kwargs)


def data(shape=(6, 3), seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float64)


# ------------------------------------------------------------------------------------------------
# Which blocks share a trace


def test_structure_key_is_equal_for_equal_structures_only():
    key = block_functions.structure_key
    assert key(mlp()) == key(mlp())  # different weights and names, same structure
    assert key(mlp()) != key(mlp(hidden=(9,)))
    assert key(mlp()) != key(mlp(activation="elu"))
    assert key(mlp()) != key(lipschitz_mlp(3, (8,), dtype="float32"))
    assert key(lambda t: 0.5 * tf.tanh(t)) is None  # not a Keras layer
    assert key(keras.layers.Dense(3)) is None  # not built
    lambda_layer = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t)])
    assert key(lambda_layer) is None  # its config does not determine its function


def test_blocks_of_one_kind_share_their_functions():
    flow = ResidualFlowBijector(num_blocks=3, hidden_units=(8,), event_size=2)
    passes = [block._passes() for block in flow.blocks]
    assert all(p is passes[0] for p in passes)
    assert passes[0].traced

    config = ImageFlowConfig(
        blocks_per_scale=(3, 2), hidden_channels=4, fc_end_blocks=2, fc_hidden_units=(8,)
    )
    image = MultiscaleResidualFlow((4, 4, 1), config)
    kinds = {}
    for block in image.blocks:
        kinds.setdefault(id(block._passes()), []).append(block.name)
    # The first block has no pre-activation; the other scale-0 blocks, the scale-1 blocks
    # and the fully connected blocks are one kind each.
    assert sorted(kinds.values()) == sorted(
        [
            ["block_0_0"],
            ["block_0_1", "block_0_2"],
            ["block_1_0", "block_1_1"],
            ["fc_block_0", "fc_block_1"],
        ]
    )


def test_blocks_with_different_settings_do_not_share():
    g1, g2 = mlp(), mlp()
    a = ResidualBlock(g1, geometric_p=0.5)
    b = ResidualBlock(g2, geometric_p=0.7)
    assert a._passes() is not b._passes()
    assert ResidualBlock(mlp())._passes() is ResidualBlock(mlp())._passes()


def test_a_python_function_runs_inline():
    block = ResidualBlock(lambda t: 0.5 * tf.tanh(t))
    assert not block._passes().traced
    x, log_det = block.inverse_and_log_det(data(), seed=1)
    assert x.shape == (6, 3)
    assert log_det.shape == (6,)


# ------------------------------------------------------------------------------------------------
# The traced passes compute what the inline ones do


@pytest.mark.parametrize("log_det", ["unbiased", "exact"])
def test_traced_passes_equal_inline_passes_in_value_and_gradient(log_det):
    g = mlp()
    traced = ResidualBlock(g, log_det=log_det)
    inline = ResidualBlock(lambda t: g(t), log_det=log_det)  # the same weights, not a Layer
    assert traced._passes().traced
    assert not inline._passes().traced
    y = data()
    weights = data(seed=2)

    def loss_and_gradients(block, direction):
        y_in = tf.identity(y)
        with tf.GradientTape() as tape:
            tape.watch(y_in)
            if direction == "inverse":
                x, log_det = block.inverse_and_log_det(y_in, seed=[1, 2])
                loss = tf.reduce_sum(weights * x) - tf.reduce_sum(log_det)
            else:
                loss = tf.reduce_sum(weights * block.forward(y_in))
        return loss, tape.gradient(loss, [y_in, *g.trainable_variables])

    for direction in ("inverse", "forward"):
        expected_loss, expected = loss_and_gradients(inline, direction)
        loss, gradients = loss_and_gradients(traced, direction)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
        for a, b in zip(gradients, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch", [5, 8])
def test_backward_in_slices_gives_the_gradients_of_the_whole_batch(batch):
    # Traced, shared passes with an unknown batch size (the slices' loop runs in the graph):
    # 5 examples in slices of 2, 2, 2 (one padded row), 8 in 2, 2, 2, 2.
    g = lipschitz_cnn((4, 4, 2), 4, initial_power_iterations=5)
    y = tf.random.stateless_normal([batch, 4, 4, 2], [0, 1])
    weights = tf.random.stateless_normal([batch, 4, 4, 2], [0, 2])

    def gradients(slice_size):
        block = ResidualBlock(g, event_ndims=3, backward_slice_size=slice_size)

        @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 2])])
        def step(y_in):
            with tf.GradientTape() as tape:
                tape.watch(y_in)
                x, log_det = block.inverse_and_log_det(y_in, seed=[3, 4])
                loss = tf.reduce_sum(weights * x) - tf.reduce_sum(log_det)
            return loss, tape.gradient(loss, [y_in, *g.trainable_variables])

        return step(y)

    expected_loss, expected = gradients(None)
    loss, sliced = gradients(2)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for a, b in zip(sliced, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_convolutional_blocks_share_one_trace_across_calls_and_blocks():
    blocks = [
        ResidualBlock(lipschitz_cnn((4, 4, 2), 4, initial_power_iterations=5), event_ndims=3)
        for _ in range(3)
    ]
    passes = blocks[0]._passes()
    y = tf.random.stateless_normal([5, 4, 4, 2], [0, 1])

    @tf.function
    def walk(t):
        total = 0.0
        for block in blocks:
            t, log_det = block.inverse_and_log_det(t)
            total += log_det
        return t, total

    walk(y)
    walk(y + 1.0)
    assert passes._joint[True].experimental_get_tracing_count() == 1


# ------------------------------------------------------------------------------------------------
# g is evaluated once per block in the forward pass, once more in the backward pass


class _Counter:
    """Counts executions (not traces) of SpectralDense.call with a py_function."""

    def __init__(self) -> None:
        self.count = 0

    def increment(self) -> np.float32:
        self.count += 1
        return np.float32(0.0)


@pytest.fixture
def counted_dense(monkeypatch):
    counter = _Counter()
    original = SpectralDense.call

    def call(self, x, *, training=None):
        tick = tf.reshape(tf.py_function(counter.increment, [], tf.float32), [])
        return original(self, x + tf.stop_gradient(tf.cast(tick, x.dtype)))

    monkeypatch.setattr(SpectralDense, "call", call)
    # Blocks of a kind share traced functions (`block_functions._SHARED`): a function traced
    # by an earlier test (whose model is still alive) would run without the patched call.
    monkeypatch.setattr(block_functions, "_SHARED", weakref.WeakValueDictionary())
    return counter


def test_g_is_evaluated_once_per_block_forward_and_once_more_backward(counted_dense):
    num_blocks, layers_per_g = 3, 2  # hidden_units=(8,): two SpectralDense layers per g
    flow = ResidualFlowBijector(num_blocks=num_blocks, hidden_units=(8,))
    model = FlowModel(flow, event_shape=[2])
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    model.initialize(x)
    per_pass = num_blocks * layers_per_g

    forward = tf.function(lambda x: model(x, training=True))
    counted_dense.count = 0
    forward(x)
    assert counted_dense.count == per_pass  # the log-det estimator's g(y) is the value

    model.train_on_batch(x)  # traces the step
    counted_dense.count = 0
    model.train_on_batch(x)
    assert counted_dense.count == 2 * per_pass  # forward, and the backward's recomputation

    with training_mode(False):
        counted_dense.count = 0
        model.log_prob(x)  # evaluation: the exact log-det (2-D) also reuses its g(y)
    assert counted_dense.count == per_pass


def test_sampling_evaluates_g_twice_per_block_when_the_first_step_meets_the_tolerance(
    counted_dense,
):
    # What the sampling profile fixed (docs/guides/solvers.md): each
    # block's inverse costs the first iterate z - g(z) and one evaluation per iteration; the
    # convergence test reuses the iteration's step, so it costs none. An untrained g is nearly
    # constant (|g| ~ 0.1-0.3, |J_g| ~ 0.05), so the first iteration's step is far inside a 0.5
    # tolerance: two evaluations per block.
    num_blocks, layers_per_g = 3, 2
    flow = ResidualFlowBijector(num_blocks=num_blocks, hidden_units=(8,), atol=0.5, rtol=0.5)
    model = FlowModel(flow, event_shape=[2])
    model.build((None, 2))
    model.sample(16, seed=[0, 1])  # traces
    for seed in ([0, 1], [2, 3]):
        counted_dense.count = 0
        model.sample(16, seed=seed)
        assert counted_dense.count == 2 * num_blocks * layers_per_g


# ------------------------------------------------------------------------------------------------
# Conditional blocks: one trace per kind, and gradients that reach the context and its network

CONTEXT_SIZE = 2


def conditional_mlp(hidden=(8,)):
    """A conditional g whose context network is moved off its zero start (so c matters)."""
    g = lipschitz_mlp(
        3, hidden, context_size=CONTEXT_SIZE, dtype="float64", initial_power_iterations=50
    )
    rng = np.random.default_rng(5)
    for layer in g.layers:
        if layer.name.startswith("context"):
            for weight in layer.trainable_weights:
                weight.assign(0.5 * rng.normal(size=weight.shape))
    return g


def context_weights(g):
    """The context network's variables (as `tf.Variable`s, which a tape can zero-fill)."""
    layers = [layer for layer in g.layers if layer.name.startswith("context")]
    return [w.value for layer in layers for w in layer.trainable_weights]


def test_conditional_blocks_of_one_kind_share_their_functions():
    a = ResidualBlock(conditional_mlp(), context_size=CONTEXT_SIZE)
    b = ResidualBlock(conditional_mlp(), context_size=CONTEXT_SIZE)
    assert block_functions.structure_key(a.residual_fn) is not None
    assert a._passes() is b._passes()
    assert a._passes().traced
    c = data((6, CONTEXT_SIZE), seed=3)
    xa, xb = a.inverse(data(), conditional_input=c), b.inverse(data(), conditional_input=c)
    assert not np.allclose(xa, xb)  # shared functions, each block's own weights


@pytest.mark.parametrize("log_det", ["unbiased", "exact"])
def test_conditional_traced_passes_equal_inline_passes(log_det):
    g = conditional_mlp()
    traced = ResidualBlock(g, log_det=log_det, num_probes=2, context_size=CONTEXT_SIZE)
    inline = ResidualBlock(lambda t: g(t), log_det=log_det, num_probes=2, context_size=CONTEXT_SIZE)
    assert traced._passes().traced
    assert not inline._passes().traced
    y, c, weights = data(), data((6, CONTEXT_SIZE), seed=3), data(seed=2)

    def loss_and_gradients(block, direction):
        y_in, c_in = tf.identity(y), tf.identity(c)
        with tf.GradientTape() as tape:
            tape.watch([y_in, c_in])
            if direction == "inverse":
                x, log_det = block.inverse_and_log_det(y_in, seed=[1, 2], conditional_input=c_in)
                loss = tf.reduce_sum(weights * x) - tf.reduce_sum(log_det)
            else:
                loss = tf.reduce_sum(weights * block.forward(y_in, conditional_input=c_in))
        return loss, tape.gradient(loss, [y_in, c_in, *g.trainable_variables])

    for direction in ("inverse", "forward"):
        expected_loss, expected = loss_and_gradients(inline, direction)
        loss, gradients = loss_and_gradients(traced, direction)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
        for a, b in zip(gradients, expected, strict=True):
            assert a is not None
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def brute_force_log_det(g, y, c, num_terms=None):
    """`log|det(I + J)|` from the full Jacobian of `g(., c)` (or its series to `num_terms`),
    differentiable in `c` and the weights by ordinary autodiff."""
    with tf.GradientTape() as tape:
        tape.watch(y)
        gy = g([y, c])
    jacobian = tape.batch_jacobian(gy, y)
    if num_terms is None:
        return tf.linalg.slogdet(tf.eye(3, dtype=y.dtype) + jacobian).log_abs_determinant
    power, total = tf.eye(3, batch_shape=[y.shape[0]], dtype=y.dtype), 0.0
    for k in range(1, num_terms + 1):
        power = power @ jacobian
        total += (-1.0) ** (k + 1) / k * tf.linalg.trace(power)
    return total


def gradient_of(fn, c, variables):
    c_in = tf.identity(c)
    with tf.GradientTape() as tape:
        tape.watch(c_in)
        loss = fn(c_in)
    # (The last layer's shift does not move the log-det: its gradient is zero, not None.)
    grads = tape.gradient(
        loss, [c_in, *variables], unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return np.concatenate([np.ravel(t) for t in grads])


def test_exact_log_det_gradient_reaches_the_context_and_its_network():
    g = conditional_mlp()
    block = ResidualBlock(g, log_det="exact", context_size=CONTEXT_SIZE)
    y, c, w = data(), data((6, CONTEXT_SIZE), seed=3), data((6,), seed=4)
    variables = context_weights(g)

    def estimated(c_in):
        with training_mode(True):
            return tf.reduce_sum(w * block.inverse_and_log_det(y, conditional_input=c_in)[1])

    expected = gradient_of(
        lambda c_in: tf.reduce_sum(w * brute_force_log_det(g, y, c_in)), c, variables
    )
    actual = gradient_of(estimated, c, variables)
    assert np.abs(expected).max() > 1e-3  # the context does move the log-det
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("fields", "num_terms"),
    [(dict(log_det="unbiased"), None), (dict(log_det="truncated", num_terms=4), 4)],
    ids=["unbiased", "truncated"],
)
def test_stochastic_log_det_gradients_are_unbiased_in_the_context(fields, num_terms):
    """z-test: the mean Neumann gradient over seeds is the exact gradient (of the log-det, or of
    the truncated series for the truncated estimator), for c and the context network."""
    g = conditional_mlp()
    block = ResidualBlock(g, context_size=CONTEXT_SIZE, **fields)
    y, c, w = data((3, 3)), data((3, CONTEXT_SIZE), seed=3), data((3,), seed=4)
    variables = context_weights(g)
    expected = gradient_of(
        lambda c_in: tf.reduce_sum(w * brute_force_log_det(g, y, c_in, num_terms)), c, variables
    )

    @tf.function
    def one_gradient(seed):
        with tf.GradientTape() as tape:
            tape.watch(c)
            with training_mode(True):
                _, log_det = block.inverse_and_log_det(y, seed=seed, conditional_input=c)
            loss = tf.reduce_sum(w * log_det)
        grads = tape.gradient(
            loss, [c, *variables], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return tf.concat([tf.reshape(t, [-1]) for t in grads], axis=0)

    samples = np.stack([one_gradient(tf.constant([i, 7])).numpy() for i in range(300)])
    mean, stderr = samples.mean(axis=0), samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    z = (mean - expected) / np.maximum(stderr, 1e-12)
    assert np.abs(z).max() < 4.5, (np.abs(z).max(), mean, expected)
    # Power: the spread is small next to the gradient, so a wrong gradient would fail.
    assert stderr.max() < 0.2 * np.abs(expected).max()


def test_inverse_gradient_in_the_context_matches_finite_differences():
    g = conditional_mlp()
    block = ResidualBlock(g, context_size=CONTEXT_SIZE, atol=1e-13, rtol=0.0)
    z, c, w = data(), data((6, CONTEXT_SIZE), seed=3), data(seed=4)

    def loss(c_in):
        return tf.reduce_sum(w * block.forward(tf.identity(z), conditional_input=c_in))

    c_in = tf.identity(c)
    with tf.GradientTape() as tape:
        tape.watch(c_in)
        value = loss(c_in)
    gradient = tape.gradient(value, c_in).numpy()
    eps = 1e-5
    numeric = np.zeros_like(gradient)
    for index in np.ndindex(*gradient.shape):
        step = np.zeros_like(gradient)
        step[index] = eps
        numeric[index] = (loss(c + step) - loss(c - step)).numpy() / (2 * eps)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(gradient, numeric, rtol=1e-6, atol=1e-8)
