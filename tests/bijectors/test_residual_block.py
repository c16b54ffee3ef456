"""Tests of ResidualBlock, ActNorm and ResidualFlowBijector as TFP bijectors."""

import functools
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from checks import assert_finite, assert_round_trip, brute_force_inverse_log_det
from sklearn.datasets import load_digits

from tfp_resflow.bijectors import residual_block
from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow
from tfp_resflow.bijectors.residual_block import ResidualBlock, training_mode
from tfp_resflow.configs.flow_configs import ImageFlowConfig
from tfp_resflow.layers import lipschitz
from tfp_resflow.layers.norm_order import NormOrder
from tfp_resflow.models.model import FlowModel
from tfp_resflow.solvers import fixed_point

tfb, tfd = tfp.bijectors, tfp.distributions


def contraction(event_size, lipschitz=0.8, seed=0, dtype="float64"):
    """Keras Dense+tanh with ||W||_2 = lipschitz (so Lip(g) <= lipschitz)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(event_size, event_size))
    layer = keras.layers.Dense(event_size, activation="tanh", dtype=dtype)
    layer.build((None, event_size))
    layer.kernel.assign(lipschitz * w / np.linalg.norm(w, 2))
    layer.bias.assign(0.1 * rng.normal(size=event_size))
    return layer


def data(shape, seed=1, dtype=np.float64):
    return tf.constant(np.random.default_rng(seed).normal(size=shape), dtype)


def trained_flow(event_size, dtype=np.float64, **kwargs):
    """A small flow, built and moved away from its initialisation so the checks are not trivial."""
    options = dict(num_blocks=2, hidden_units=(16,), log_det="exact")
    flow = ResidualFlowBijector(**{**options, **kwargs})
    y = data((64, event_size), seed=2, dtype=dtype) * 2.0 + 1.0
    flow.inverse(y)  # builds and runs ActNorm's data-dependent initialisation
    rng = np.random.default_rng(3)
    for variable in flow.trainable_variables:
        variable.assign_add(0.3 * rng.normal(size=variable.shape))
    # Re-converge the norm estimates, so the perturbed kernels are inside the bound again.
    lipschitz.update_lipschitz(flow.keras_layers, atol=1e-6, rtol=1e-6)
    return flow


# ------------------------------------------------------------------------------------------------
# ResidualBlock


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("event_size", [2, 5])
def test_block_round_trip_and_finite(event_size, dtype):
    block = ResidualBlock(contraction(event_size, dtype=np.dtype(dtype).name))
    y = data((7, event_size), dtype=dtype)
    atol = 1e-4 if dtype == np.float32 else 1e-8
    assert_round_trip(block, y, atol=atol)
    assert_finite(block.inverse_log_det_jacobian(tf.identity(y), event_ndims=1))
    assert block.forward(y).dtype == dtype


@pytest.mark.parametrize("event_size", [2, 5, 10])
def test_block_exact_log_det_matches_brute_force(event_size):
    block = ResidualBlock(contraction(event_size), log_det="exact")
    y = data((4, event_size))
    ildj = block.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    np.testing.assert_allclose(ildj, brute_force_inverse_log_det(block, y, 1), atol=1e-10)
    # TFP's fldj(x) must be -ildj(forward(x)).
    x = block.forward(tf.identity(y))
    fldj = block.forward_log_det_jacobian(tf.identity(y), event_ndims=1)
    np.testing.assert_allclose(
        fldj, -block.inverse_log_det_jacobian(tf.identity(x), event_ndims=1), atol=1e-10
    )


def test_block_handles_extra_batch_dimensions():
    block = ResidualBlock(contraction(3), log_det="exact")
    y = data((2, 4, 3))
    ildj = block.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    assert ildj.shape == (2, 4)
    flat = block.inverse_log_det_jacobian(tf.reshape(y, [8, 3]), event_ndims=1)
    np.testing.assert_allclose(tf.reshape(ildj, [8]), flat, atol=1e-12)
    assert block.inverse(tf.identity(y)).shape == (2, 4, 3)
    # event_ndims above the minimum sums the extra event dimensions.
    np.testing.assert_allclose(
        block.inverse_log_det_jacobian(tf.identity(y), event_ndims=2),
        tf.reduce_sum(ildj, axis=-1),
        atol=1e-12,
    )


def test_block_on_image_events():
    conv = keras.Sequential(
        [
            keras.Input((3, 3, 1), dtype="float64"),
            keras.layers.Conv2D(1, 3, padding="same", dtype="float64"),
        ]
    )
    conv.build((None, 3, 3, 1))
    kernel = conv.layers[0].kernel
    kernel.assign(kernel * 0.5 / np.abs(kernel.numpy()).sum())  # ||conv||_2 <= l1 of kernel
    block = ResidualBlock(conv, event_ndims=3, log_det="exact")
    y = data((2, 3, 3, 1))
    assert_round_trip(block, y, atol=1e-8)
    np.testing.assert_allclose(
        block.inverse_log_det_jacobian(tf.identity(y), event_ndims=3),
        brute_force_inverse_log_det(block, y, 3),
        atol=1e-10,
    )


def test_training_estimate_is_fresh_and_evaluation_is_exact_for_small_events():
    block = ResidualBlock(contraction(4))
    y = data((3, 4))
    first = block.inverse_log_det_jacobian(y, event_ndims=1)
    second = block.inverse_log_det_jacobian(y, event_ndims=1)  # the same tensor object
    assert not np.allclose(first, second)
    with training_mode(False):
        evaluation = block.inverse_log_det_jacobian(y, event_ndims=1)
    np.testing.assert_allclose(evaluation, brute_force_inverse_log_det(block, y, 1), atol=1e-10)


def test_evaluation_mode_for_large_events_uses_twenty_exact_terms():
    block = ResidualBlock(contraction(4))
    estimator = block.log_det_fn(training=False, event_size=100)
    assert estimator.func.__name__ == "russian_roulette_log_det"
    assert estimator.keywords["num_exact_terms"] == 20


def test_no_stale_values_after_a_variable_update_in_eager_mode():
    g = contraction(3)
    block = ResidualBlock(g, log_det="exact")
    y = data((4, 3))
    before_x = block.inverse(y).numpy()
    before_ldj = block.inverse_log_det_jacobian(y, event_ndims=1).numpy()
    g.kernel.assign(g.kernel * 0.5)
    after_x = block.inverse(y).numpy()  # the same tensor object as before
    after_ldj = block.inverse_log_det_jacobian(y, event_ndims=1).numpy()
    assert not np.allclose(before_x, after_x)
    assert not np.allclose(before_ldj, after_ldj)
    np.testing.assert_allclose(after_x, y + g(y), atol=1e-12)


def test_fixed_point_inverse_has_the_implicit_gradient():
    g = contraction(3)
    block = ResidualBlock(g, atol=1e-12, rtol=1e-12)
    z = data((2, 3))
    weights = data((2, 3), seed=5)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        loss = tf.reduce_sum(block.forward(z) * weights)
    grad_z = tape.gradient(loss, z).numpy()
    grad_kernel = tape.gradient(loss, g.kernel).numpy()
    # Central differences of the solve itself (float64, converged to 1e-12).
    eps = 1e-6

    def loss_at(z_value):
        return float(tf.reduce_sum(block.forward(tf.constant(z_value)) * weights))

    expected = np.zeros_like(grad_z)
    for idx in np.ndindex(*z.shape):
        step = np.zeros(z.shape)
        step[idx] = eps
        expected[idx] = (loss_at(z.numpy() + step) - loss_at(z.numpy() - step)) / (2 * eps)
    np.testing.assert_allclose(grad_z, expected, atol=1e-7)
    kernel = g.kernel.numpy()
    step = np.zeros_like(kernel)
    step[0, 1] = eps
    g.kernel.assign(kernel + step)
    plus = loss_at(z.numpy())
    g.kernel.assign(kernel - step)
    minus = loss_at(z.numpy())
    g.kernel.assign(kernel)
    np.testing.assert_allclose(grad_kernel[0, 1], (plus - minus) / (2 * eps), atol=1e-7)


@pytest.mark.parametrize("lipschitz_estimate", ["power", "gram"])
def test_fixed_point_gradient_reaches_spectral_kernels_through_their_normalisation(
    lipschitz_estimate,
):
    # The solve takes each layer's W_eff = W / max(1, sigma / c), computed once outside its
    # loop: the gradient must still be that of the whole map W -> x, rescaling included.
    keras.utils.set_random_seed(2)
    spectral = functools.partial(
        lipschitz.SpectralDense,
        lipschitz_constant=0.7,
        lipschitz_estimate=lipschitz_estimate,
        dtype="float64",
    )
    tanh = keras.layers.Activation("tanh", dtype="float64")
    g = keras.Sequential([spectral(6), tanh, spectral(3)])
    g.build((None, 3))
    first = g.layers[0]
    first.kernel.assign(3.0 * first.kernel)  # sigma well above c: the rescaling is active
    lipschitz.update_lipschitz([g], atol=1e-12, rtol=1e-12)
    assert float(first.sigma()) > 1.5 * first.lipschitz_constant
    block = ResidualBlock(g, atol=1e-12, rtol=1e-12)
    z = data((2, 3))
    weights = data((2, 3), seed=5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(block.forward(z) * weights)
    gradient = tape.gradient(loss, first.kernel).numpy()
    kernel, eps = first.kernel.numpy(), 1e-6
    expected = np.zeros_like(kernel)
    for index in [(0, 0), (1, 2), (2, 5)]:
        step = np.zeros_like(kernel)
        step[index] = eps
        values = []
        for sign in (1.0, -1.0):
            first.kernel.assign(kernel + sign * step)
            values.append(float(tf.reduce_sum(block.forward(tf.identity(z)) * weights)))
        first.kernel.assign(kernel)
        expected[index] = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(gradient[index], expected[index], rtol=1e-5, atol=1e-8)
    # The solve inverts g as g's own call computes it (W_eff recomputed in the call).
    x = block.forward(tf.identity(z))
    np.testing.assert_allclose(x + g(x), z, atol=1e-10)


@pytest.mark.parametrize("solver_jit_compile", [False, True], ids=["graph", "xla"])
def test_non_convergence_raises_with_the_residual(solver_jit_compile):
    def expanding(x):  # Lip = 1.5: the fixed-point iteration diverges
        return -1.5 * x

    options = dict(max_iterations=20, solver_jit_compile=solver_jit_compile)
    block = ResidualBlock(expanding, **options)
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not converge within 20"):
        block.forward(data((2, 3)))
    quiet = ResidualBlock(expanding, on_nonconvergence="nan", **options)
    assert np.all(np.isnan(quiet.forward(data((2, 3)))))


@pytest.mark.parametrize("solver_name", ["plain", "anderson"])
def test_an_xla_compiled_iteration_gives_the_same_inverse_and_gradient(solver_name):
    layer = contraction(4, lipschitz=0.9)
    z = data((5, 4))
    weights = data((5, 4), seed=7)
    results = []
    for solver_jit_compile in (False, True):
        block = ResidualBlock(layer, solver=solver_name, solver_jit_compile=solver_jit_compile)
        with tf.GradientTape() as tape:
            tape.watch(z)
            x = block.forward(tf.identity(z))
            loss = tf.reduce_sum(x * weights)
        results.append([x, *tape.gradient(loss, [z, *layer.trainable_variables])])
    for graph, xla in zip(*results, strict=True):
        np.testing.assert_allclose(xla, graph, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(results[1][0] + layer(results[1][0]), z, atol=1e-10)


def test_nan_input_raises_with_validate_args():
    block = ResidualBlock(contraction(2), validate_args=True)
    bad = tf.constant([[0.0, np.nan]], tf.float64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        block.inverse(bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        block.inverse_log_det_jacobian(bad, event_ndims=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(event_ndims=2), "event_ndims must be 1 or 3; got 2"),
        (dict(log_det="magic"), "log_det must be one of .* got 'magic'"),
        (dict(max_iterations=0), "max_iterations must be an integer >= 1; got 0"),
        (dict(atol=-1.0), "atol must be a number >= 0; got -1.0"),
        (dict(on_nonconvergence="ignore"), "on_nonconvergence .* got 'ignore'"),
        (dict(geometric_p=0.0), "geometric_p must be a number in \\(0, 1\\); got 0.0"),
        (dict(solver="newton"), "solver must be one of .* got 'newton'"),
        (dict(probes=2), "unknown BlockConfig field\\(s\\) \\['probes'\\]"),
    ],
)
def test_block_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualBlock(tf.tanh, **kwargs)


def test_block_exposes_keras_variables_to_tf_module_tracking():
    g = contraction(3)
    block = ResidualBlock(g)
    block.inverse(data((2, 3)))
    assert {id(v) for v in block.trainable_variables} == {id(w.value) for w in g.weights}
    chain = tfb.Chain([tfb.Shift(tf.Variable(1.0, dtype=tf.float64)), block])
    assert len(chain.trainable_variables) == 3


# ------------------------------------------------------------------------------------------------
# ActNorm


@pytest.mark.parametrize("event_ndims", [1, 3])
def test_actnorm_initialises_from_the_first_batch(event_ndims):
    shape = (256, 3) if event_ndims == 1 else (32, 2, 2, 3)
    y = data(shape) * tf.constant([0.1, 2.0, 5.0], tf.float64) + tf.constant(
        [1.0, -2.0, 3.0], tf.float64
    )
    actnorm = ActNorm(ActNormLayer(dtype="float64"), event_ndims=event_ndims)
    z = actnorm.inverse(y).numpy().reshape(-1, 3)
    variance = y.numpy().reshape(-1, 3).var(axis=0)
    # Zero mean; unit variance except where the 0.2 floor applies (feature 0: var 0.01).
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.var(axis=0), variance / np.maximum(variance, 0.2), rtol=1e-5)
    assert_round_trip(actnorm, y, atol=1e-6)
    positions = 1 if event_ndims == 1 else 4
    expected = -0.5 * np.log(np.maximum(variance, 0.2)).sum() * positions
    ildj = actnorm.inverse_log_det_jacobian(y, event_ndims=event_ndims)
    np.testing.assert_allclose(ildj, np.full(shape[0], expected), rtol=1e-5)
    small = y[:2]
    np.testing.assert_allclose(
        actnorm.inverse_log_det_jacobian(small, event_ndims=event_ndims),
        brute_force_inverse_log_det(actnorm, small, event_ndims),
        rtol=1e-5,
    )
    # A second batch does not re-initialise.
    before = actnorm.layer.bias.numpy()
    actnorm.inverse(y * 3.0)
    np.testing.assert_array_equal(actnorm.layer.bias.numpy(), before)


def test_actnorm_init_can_be_suppressed():
    actnorm = ActNorm()
    with residual_block.data_dependent_init(False):
        actnorm.inverse(tf.constant([[5.0, 6.0], [7.0, 9.0]]))
    np.testing.assert_array_equal(actnorm.layer.bias.numpy(), [0.0, 0.0])
    assert float(actnorm.layer.initialized.numpy()) == 0.0


# ------------------------------------------------------------------------------------------------
# ResidualFlowBijector


def test_default_flow_works_as_written_in_a_transformed_distribution():
    distribution = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(0.0, 1.0), [2]), ResidualFlowBijector()
    )
    x = tf.random.stateless_normal([5, 2], seed=[0, 1])
    log_prob = distribution.log_prob(x)
    assert log_prob.shape == (5,)
    assert_finite(log_prob)
    assert distribution.sample(3).shape == (3, 2)
    flow = distribution.bijector
    assert len(flow.blocks) == 8
    assert all(isinstance(b, ResidualBlock) for b in flow.blocks)
    assert all(isinstance(b.residual_fn, keras.Model) for b in flow.blocks)
    keras_weights = {id(w.value) for layer in flow.keras_layers for w in layer.trainable_weights}
    assert {id(v) for v in flow.trainable_variables} == keras_weights
    assert {id(v) for v in distribution.trainable_variables} == keras_weights


@pytest.mark.parametrize("event_size", [2, 5, 10])
def test_flow_exact_log_det_matches_brute_force(event_size):
    flow = trained_flow(event_size)
    y = data((3, event_size), seed=4)
    ildj = flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    np.testing.assert_allclose(ildj, brute_force_inverse_log_det(flow, y, 1), atol=1e-9)
    assert_round_trip(flow, y, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flow_dtypes_and_batch_dimensions(dtype):
    flow = trained_flow(3, dtype=dtype, log_det="unbiased")
    y = data((2, 4, 3), dtype=dtype)
    x = flow.inverse(tf.identity(y))
    ildj = flow.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    assert x.dtype == dtype
    assert ildj.dtype == dtype
    assert x.shape == (2, 4, 3)
    assert ildj.shape == (2, 4)
    assert_finite(x, ildj)
    atol = 1e-4 if dtype == np.float32 else 1e-8
    assert_round_trip(flow, y, atol=atol)


def test_flow_seed_makes_the_estimate_reproducible():
    flow = trained_flow(3, log_det="unbiased")
    y = data((4, 3))
    first = flow.inverse_log_det_jacobian(y, event_ndims=1, seed=7)
    again = flow.inverse_log_det_jacobian(y, event_ndims=1, seed=7)
    other = flow.inverse_log_det_jacobian(y, event_ndims=1, seed=8)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


COMPOSITIONS = {
    "chain-shift-scale": lambda flow: tfb.Chain(
        [tfb.Shift(tf.constant(1.0, tf.float64)), flow, tfb.Scale(tf.constant(2.0, tf.float64))]
    ),
    "invert": lambda flow: tfb.Invert(flow),
    "chain-of-invert": lambda flow: tfb.Chain(
        [tfb.Scale(tf.constant(0.5, tf.float64)), tfb.Invert(flow)]
    ),
}


@pytest.mark.parametrize("compose", COMPOSITIONS.values(), ids=COMPOSITIONS.keys())
def test_compositions_round_trip_and_log_det(compose):
    bijector = compose(trained_flow(3))
    y = data((4, 3), seed=6)
    assert_round_trip(bijector, y, atol=1e-7)
    ildj = bijector.inverse_log_det_jacobian(tf.identity(y), event_ndims=1)
    np.testing.assert_allclose(ildj, brute_force_inverse_log_det(bijector, y, 1), atol=1e-9)


BASES = {
    "mvn-diag": lambda: tfd.MultivariateNormalDiag(
        loc=tf.constant([0.5, -1.0, 0.0], tf.float64),
        scale_diag=tf.constant([1.0, 2.0, 0.5], tf.float64),
    ),
    "sample-normal": lambda: tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), 3),
}


@pytest.mark.parametrize("make_base", BASES.values(), ids=BASES.keys())
def test_transformed_distribution_log_prob_and_sample(make_base):
    flow = trained_flow(3)
    base = make_base()
    distribution = tfd.TransformedDistribution(base, flow)
    y = data((5, 3), seed=8)
    with training_mode(False):  # exact log-dets for 3-D events
        log_prob = distribution.log_prob(tf.identity(y))
        expected = base.log_prob(flow.inverse(tf.identity(y))) + brute_force_inverse_log_det(
            flow, y, 1
        )
    np.testing.assert_allclose(log_prob, expected, atol=1e-9)
    samples = distribution.sample(6, seed=[1, 2])
    assert samples.shape == (6, 3)
    assert_finite(samples)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sample_and_log_prob_in_one_tf_function(jit_compile):
    flow = trained_flow(2, log_det="unbiased")
    distribution = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), 2), flow
    )

    @functools.partial(tf.function, jit_compile=jit_compile)
    def sample_and_log_prob():
        samples = distribution.sample(8, seed=[3, 4])
        return samples, distribution.log_prob(samples)

    samples, log_prob = sample_and_log_prob()
    assert samples.shape == (8, 2)
    assert_finite(samples, log_prob)
    with training_mode(False):
        exact = distribution.log_prob(tf.identity(samples))
    # Unbiased estimates of the exact value: close for this small, mildly nonlinear flow.
    np.testing.assert_allclose(log_prob, exact, atol=1.0)


def test_log_prob_reflects_weights_after_apply_gradients():
    flow = trained_flow(2, log_det="unbiased")
    distribution = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), 2), flow
    )
    x = data((16, 2), seed=9)
    first, second = distribution.log_prob(x), distribution.log_prob(x)
    assert not np.allclose(first, second)  # every call is a fresh unbiased estimate
    with training_mode(False):
        before = distribution.log_prob(x).numpy()
    optimizer = keras.optimizers.SGD(0.05)
    variables = list(flow.trainable_variables)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(distribution.log_prob(x))
    grads = tape.gradient(loss, variables)
    assert all(g is not None for g in grads)
    optimizer.apply_gradients(zip(grads, variables, strict=True))
    with training_mode(False):
        after = distribution.log_prob(x).numpy()  # the same tensor object
        fresh = distribution.log_prob(tf.identity(x)).numpy()
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, fresh, atol=1e-12)


def test_wrong_event_size_raises_a_clear_error():
    flow = ResidualFlowBijector(num_blocks=1, hidden_units=(4,))
    flow.inverse(tf.zeros([2, 3]))
    with pytest.raises(ValueError, match="built for events of size 3; got events of size 5"):
        flow.inverse(tf.zeros([2, 5]))


def test_flow_nan_input_raises_with_validate_args():
    flow = ResidualFlowBijector(num_blocks=1, hidden_units=(4,), validate_args=True)
    flow.inverse(tf.zeros([2, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        flow.inverse(tf.constant([[np.nan, 0.0]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_blocks=0), "num_blocks must be an integer >= 1; got 0"),
        (
            dict(lipschitz_constant=1.0),
            "lipschitz_constant must be a number in \\(0, 1\\); got 1.0",
        ),
        (dict(log_det="nope"), "log_det must be one of"),
        (dict(hidden_units=(4,), norm_orders=[2, 2]), "norm_orders needs 3 entries"),
        (dict(norm_orders=[1, 2, 2, 1], learnable_norm_orders=True), "start in \\(1, 5\\)"),
        (dict(learnable_norm_orders=1), "learnable_norm_orders must be a bool; got 1"),
    ],
)
def test_flow_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualFlowBijector(event_size=2, **kwargs)


def test_eager_log_prob_does_not_solve_the_fixed_point():
    # TFP's log_prob asks for forward(inverse(y)) (its density correction); the block answers
    # it from the joint pass of its inverse (`density_pass`), so g runs once.
    layer = contraction(3, lipschitz=0.95)
    calls = []

    def counting_g(x):
        calls.append(1)
        return layer(x)

    block = ResidualBlock(counting_g, log_det="unbiased")
    distribution = tfd.TransformedDistribution(
        tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), 3), block
    )
    y = data((4, 3))
    distribution.log_prob(y)
    assert len(calls) == 1  # the joint pass: the value is the estimator's g(y)
    calls.clear()
    x = block.inverse(y)
    block.forward(x)  # outside a log_prob: warm-started from y, one step
    assert len(calls) == 2
    calls.clear()
    block.forward(data((4, 3), seed=11))  # a cold solve needs many steps at Lip 0.95
    assert len(calls) > 10


def test_flow_norm_orders_reach_every_g_and_the_config_round_trips():
    flow = ResidualFlowBijector(
        num_blocks=2, hidden_units=(4,), norm_orders=[2, "inf", 2], event_size=2
    )
    for block in flow.blocks:
        first, last = lipschitz.spectral_layers(block.keras_layers)
        assert (first.domain, first.codomain, last.codomain) == (2.0, math.inf, 2.0)
    config = json.loads(json.dumps(flow.get_config()))
    assert config["config"]["norm_orders"] == [2.0, "inf", 2.0]
    clone = ResidualFlowBijector.from_config(config)
    assert clone.get_config() == flow.get_config()
    learned = ResidualFlowBijector(hidden_units=(4,), learnable_norm_orders=True, event_size=3)
    assert learned.get_config()["config"]["norm_orders"] == [2.0, 2.0, 2.0]
    assert all(
        isinstance(layer.domain, NormOrder)
        for block in learned.blocks
        for layer in lipschitz.spectral_layers(block.keras_layers)
    )


# ------------------------------------------------------------------------------------------------
# The inverse's stated accuracy: every block's fixed point x of `x + g(x) = z` reconstructs z to
# within the solver's tolerance, `|x + g(x) - z| <= atol + rtol |z|` in every element
# (`BlockConfig.atol`, `rtol`; by dtype when None), on untrained and trained flows.

ACCURACY_FLOWS = {
    "vector": (
        (2,),
        lambda dtype: ResidualFlowBijector(
            num_blocks=3, hidden_units=(32, 32), event_size=2, dtype=dtype
        ),
    ),
    "image": (
        (8, 8, 1),
        lambda dtype: MultiscaleResidualFlow(
            (8, 8, 1),
            ImageFlowConfig(
                blocks_per_scale=(2, 2),
                hidden_channels=8,
                fc_end_blocks=1,
                fc_hidden_units=(16,),
                logit_alpha=0.05,
            ),
            dtype=dtype,
        ),
    ),
}


def _accuracy_data(kind):
    rng = np.random.default_rng(0)
    if kind == "vector":  # two clusters: the flow has to bend space to fit them
        centres = rng.choice([-2.0, 2.0], size=(512, 1)) * np.ones((1, 2))
        return (centres + 0.3 * rng.normal(size=(512, 2))).astype(np.float32)
    images = load_digits().images[:512, :, :, None]  # counts 0..16, dequantised into (0, 1)
    return ((images + rng.uniform(size=images.shape)) / 17.0).astype(np.float32)


@functools.cache
def _trained_weights(kind):
    """Per Keras layer of the flow, its weights after a short fit (Adam 1e-2, float32)."""
    keras.utils.set_random_seed(0)
    shape, make = ACCURACY_FLOWS[kind]
    model = FlowModel(make("float32"), shape)
    x = _accuracy_data(kind)
    model.build((None, *shape))
    model.initialize(x[:256])
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, batch_size=64, epochs=3, verbose=0)
    model.update_lipschitz(atol=1e-6, rtol=1e-6)  # the trained kernels' norms, converged
    return [layer.get_weights() for layer in model.bijector.keras_layers]


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "trained"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ACCURACY_FLOWS)
def test_every_fixed_point_meets_the_stated_reconstruction_accuracy(kind, dtype, trained):
    keras.utils.set_random_seed(0)
    shape, make = ACCURACY_FLOWS[kind]
    flow = make(dtype)
    x = tf.constant(_accuracy_data(kind)[:64], dtype)
    latent = flow.inverse(x)  # builds, and initialises ActNorm from the data
    if trained:
        for layer, weights in zip(flow.keras_layers, _trained_weights(kind), strict=True):
            layer.set_weights(weights)
    solves = []
    forward = ResidualBlock._forward  # noqa: SLF001

    def recorded(block, z, **kwargs):
        x = forward(block, z, **kwargs)
        solves.append((block, z, x))
        return x

    z = tf.constant(np.random.default_rng(1).normal(size=latent.shape), dtype)
    with training_mode(False), pytest.MonkeyPatch.context() as patch:
        patch.setattr(ResidualBlock, "_forward", recorded)
        assert_finite(flow.forward(z))
    assert len(solves) == len(flow.blocks)
    for block, z_block, x_block in solves:
        atol, rtol = fixed_point.tolerances(dtype, block.config.atol, block.config.rtol)
        with training_mode(False):
            error = np.abs(block.inverse(tf.identity(x_block)) - z_block)  # x + g(x) - z
        bound = atol + rtol * np.abs(z_block)
        assert np.all(error <= bound), f"{block.name}: {np.max(error / bound):.3g} x the bound"
