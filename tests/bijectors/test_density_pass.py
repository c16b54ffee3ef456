"""`tfd.TransformedDistribution.log_prob` evaluates each block's `g` once (`density_pass`)."""

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_resflow.bijectors import block_functions, density_pass
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.fresh_bijector import keras_layers_of
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.core.context import conditional_kwargs
from tfp_resflow.layers.lipschitz import SpectralDense
from tfp_resflow.layers.network import lipschitz_mlp

tfb, tfd = tfp.bijectors, tfp.distributions

NUM_BLOCKS, LAYERS_PER_G, CONTEXT_SIZE = 3, 2, 2  # hidden_units=(8,): two SpectralDense per g


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture
def counter(monkeypatch):
    """Counts executions of every g (a variable incremented in each SpectralDense call)."""
    count = tf.Variable(0.0, trainable=False)
    original = SpectralDense.call

    def call(self, x, *, training=None):
        count.assign_add(1.0 / LAYERS_PER_G)
        return original(self, x)

    monkeypatch.setattr(SpectralDense, "call", call)
    # Functions traced by earlier tests would run without the patched call.
    monkeypatch.setattr(block_functions, "_SHARED", weakref.WeakValueDictionary())
    return count


def blocks(context_size=None, **fields):
    return [
        ResidualBlock(
            lipschitz_mlp(2, (8,), context_size=context_size),
            context_size=context_size,
            name=f"block{i}",
            **fields,
        )
        for i in range(NUM_BLOCKS)
    ]


def flow(kind, **fields):
    """(bijector, number of blocks, a function of the context giving the bijector kwargs)."""
    no_kwargs = lambda c: {}  # noqa: E731
    if kind == "block":
        return blocks(**fields)[0], 1, no_kwargs
    if kind == "chain":
        return tfb.Chain(blocks(**fields)), NUM_BLOCKS, no_kwargs
    if kind == "residual-flow":
        residual_flow = ResidualFlowBijector(num_blocks=NUM_BLOCKS, hidden_units=(8,), **fields)
        return residual_flow, NUM_BLOCKS, no_kwargs
    if kind == "invert-chain-invert":
        chain = tfb.Chain([tfb.Invert(b) for b in blocks(**fields)])
        return tfb.Invert(chain), NUM_BLOCKS, no_kwargs
    if kind == "conditional-chain":
        chain = tfb.Chain(blocks(context_size=CONTEXT_SIZE, **fields))
        return chain, NUM_BLOCKS, lambda c: conditional_kwargs(chain, c)
    raise ValueError(kind)


KINDS = ["block", "chain", "residual-flow", "invert-chain-invert", "conditional-chain"]


def distribution(bijector):
    return tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), bijector)


def data(shape=(16, 2), seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def weights(bijector):
    return [w for layer in keras_layers_of(bijector) for w in layer.trainable_weights]


# ------------------------------------------------------------------------------------------------
# TFP's sequence, on which the mechanism rests (fails loudly if a TFP upgrade changes it)


def test_tfp_computes_the_density_through_the_method_the_records_watch(monkeypatch):
    inside = []
    original = ResidualBlock._inverse

    def spy(self, y, **kwargs):
        inside.append(density_pass.density_correction_follows() is not None)
        return original(self, y, **kwargs)

    monkeypatch.setattr(ResidualBlock, "_inverse", spy)
    block = blocks()[0]
    distribution(block).log_prob(data())
    distribution(block).prob(data())
    distribution(block).experimental_local_measure(data(), backward_compat=True)
    block.inverse(data())  # outside: the value alone
    assert inside == [True, True, True, False]


def test_inverse_outside_a_distribution_computes_no_log_det(monkeypatch):
    block = blocks()[0]
    block.inverse(data())  # builds g
    monkeypatch.setattr(
        ResidualBlock, "_inverse_and_log_det", lambda *a, **k: pytest.fail("log-det computed")
    )
    block.inverse(data())
    tf.function(block.inverse)(data())
    assert block._records() == []


# ------------------------------------------------------------------------------------------------
# g evaluations per block: once forward, at most once more backward


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("training", [True, False])
def test_log_prob_evaluates_g_once_per_block(counter, kind, mode, training):
    bijector, num_blocks, kwargs_of = flow(kind)
    dist = distribution(bijector)
    x, c = data(), data((16, CONTEXT_SIZE), seed=1)
    kwargs = kwargs_of(c)
    dist.log_prob(x, bijector_kwargs=kwargs)  # builds
    variables = weights(bijector)

    def forward():
        return dist.log_prob(x, bijector_kwargs=kwargs)

    def forward_and_backward():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x, bijector_kwargs=kwargs))
        return tape.gradient(loss, variables)

    if mode == "function":
        forward, forward_and_backward = tf.function(forward), tf.function(forward_and_backward)
    with training_mode(training):
        forward(), forward_and_backward()  # traces
        counter.assign(0.0)
        forward()
        assert counter.numpy() == pytest.approx(num_blocks)
        counter.assign(0.0)
        gradients = forward_and_backward()
        assert counter.numpy() <= 2 * num_blocks + 1e-6
    assert all(g is not None for g in gradients) or not training
    assert all(b._records() == [] for b in _residual_bijectors(bijector))


@pytest.mark.parametrize("kind", ["chain", "invert-chain-invert"])
def test_log_prob_evaluates_g_once_per_block_under_xla(counter, kind):
    bijector, num_blocks, _ = flow(kind)
    dist = distribution(bijector)
    x = data()
    dist.log_prob(x)
    variables = weights(bijector)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(dist.log_prob(x))
        return loss, tape.gradient(loss, variables)

    step()
    counter.assign(0.0)
    loss, _ = step()
    assert np.isfinite(loss)
    assert counter.numpy() <= 2 * num_blocks + 1e-6
    forward = tf.function(lambda: dist.log_prob(x), jit_compile=True)
    forward()
    counter.assign(0.0)
    forward()
    assert counter.numpy() == pytest.approx(num_blocks)


def _residual_bijectors(bijector):
    found, stack = [], [bijector]
    while stack:
        b = stack.pop()
        if isinstance(b, density_pass.SharedDensityPass):
            found.append(b)
        stack.extend(getattr(b, "bijectors", None) or [])
        if isinstance(getattr(b, "bijector", None), tfb.Bijector):
            stack.append(b.bijector)
    return found


# ------------------------------------------------------------------------------------------------
# Values: the estimate of the two calls for the same seeds


@pytest.mark.parametrize("kind", ["block", "residual-flow"])
@pytest.mark.parametrize("training", [True, False])
def test_log_prob_equals_inverse_then_log_det_for_a_seed(kind, training):
    bijector, _, _ = flow(kind, num_probes=1)
    dist = distribution(bijector)
    y = data()
    seed = tf.constant([3, 4])
    with training_mode(training):
        log_prob = dist.log_prob(y, bijector_kwargs={"seed": seed})
        y_copy = tf.identity(y)  # TFP's cache defeated
        x = bijector.inverse(y_copy, seed=seed)
        expected = dist.distribution.log_prob(x) + bijector.inverse_log_det_jacobian(
            y_copy, event_ndims=1, seed=seed
        )
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6, atol=1e-6)


def test_chain_log_prob_equals_the_two_calls_per_member():
    members = blocks()
    chain = tfb.Chain(members)
    dist = distribution(chain)
    y = data()
    seeds = {b.name: {"seed": tf.constant([i, 7])} for i, b in enumerate(members)}
    log_prob = dist.log_prob(y, bijector_kwargs=seeds)
    x = chain.inverse(tf.identity(y), **seeds)
    log_det = chain.inverse_log_det_jacobian(tf.identity(y), event_ndims=1, **seeds)
    np.testing.assert_allclose(log_prob, dist.distribution.log_prob(x) + log_det, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Nothing stale: an optimizer step between two log_probs of the same tensor


def _step_then_log_prob(dist, y, variables, compile_step):
    optimizer = keras.optimizers.SGD(0.5)
    optimizer.build(variables)

    def step_then_log_prob():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(dist.log_prob(y))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return dist.log_prob(y)  # the same tensor, new weights

    return (tf.function(step_then_log_prob) if compile_step else step_then_log_prob)()


@pytest.mark.parametrize(
    ("kind", "compile_step"),
    [
        ("block", False),
        ("block", True),
        ("residual-flow", False),
        ("residual-flow", True),
        ("chain", False),
    ],
)
def test_no_stale_log_prob_after_an_optimizer_step(kind, compile_step):
    bijector, _, _ = flow(kind, log_det="exact")  # deterministic: fresh equals stale-free
    dist = distribution(bijector)
    y = data()
    before = dist.log_prob(y)
    after = _step_then_log_prob(dist, y, weights(bijector), compile_step)
    fresh = dist.log_prob(tf.identity(y))
    assert not np.allclose(after, before, atol=1e-3)  # the step moved the weights
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-5)
