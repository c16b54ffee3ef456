"""Tests of tfp_resflow.lipschitz: norms against independent numpy ground truth."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from checks import brute_force_induced_norm_2d

from tfp_resflow.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    norm_order_loss,
    spectral_layers,
    update_lipschitz,
)
from tfp_resflow.norm_order import NormOrder, order_of_logit

# Tight tolerance for "after convergence": far below the 1% the issue asks for.
CONVERGE = dict(atol=1e-7, rtol=1e-7, max_iterations=3000)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def dense(n_in, units, *, stddev=1.0, dtype="float64", **kwargs):
    init = keras.initializers.RandomNormal(stddev=stddev, seed=1)
    layer = SpectralDense(units, kernel_initializer=init, dtype=dtype, **kwargs)
    layer.build((None, n_in))
    return layer


def conv(in_shape, filters, kernel_size, *, stddev=1.0, dtype="float64", **kwargs):
    init = keras.initializers.RandomNormal(stddev=stddev, seed=1)
    layer = SpectralConv2D(filters, kernel_size, kernel_initializer=init, dtype=dtype, **kwargs)
    layer.build((None, *in_shape))
    return layer


def operator_matrix(fn, in_shape, dtype=tf.float64):
    """Explicit matrix A [n_out, n_in] of the affine map fn, from its response to impulses."""
    n = int(np.prod(in_shape))
    impulses = tf.reshape(tf.eye(n, dtype=dtype), [n, *in_shape])
    response = fn(impulses) - fn(tf.zeros_like(impulses[:1]))  # remove the bias
    return tf.reshape(response, [n, -1]).numpy().T


def induced_norm(a, p, q):
    """Closed forms of ||A||_{p->q} for p = 1 or q = inf (numpy, on the explicit matrix)."""
    if p == 1:
        return np.max(np.linalg.norm(a, q, axis=0))
    p_dual = np.inf if p == 1 else 1.0 if p == np.inf else p / (p - 1)
    return np.max(np.linalg.norm(a, p_dual, axis=1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("n_in", "units"), [(5, 3), (3, 7), (16, 16)])
def test_dense_sigma_matches_numpy(dtype, n_in, units):
    layer = dense(n_in, units, dtype=dtype, lipschitz_constant=0.9)
    sigma = float(layer.update_lipschitz(**CONVERGE))
    true = np.linalg.norm(layer.kernel.numpy().astype(np.float64), 2)
    assert sigma == pytest.approx(true, rel=1e-2)
    assert float(layer.sigma()) == pytest.approx(sigma, rel=1e-5)


CONV_CASES = {
    "3x3": dict(in_shape=(5, 5, 2), kernel_size=3),
    "3x3-stride2": dict(in_shape=(5, 5, 2), kernel_size=3, strides=2),
    "3x3-valid": dict(in_shape=(5, 6, 2), kernel_size=3, padding="valid"),
    "3x1": dict(in_shape=(5, 4, 2), kernel_size=(3, 1)),
    "1x1": dict(in_shape=(4, 4, 3), kernel_size=1),
    "1x1-stride2": dict(in_shape=(4, 4, 3), kernel_size=1, strides=2),
}


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_sigma_matches_impulse_matrix(case):
    case = dict(case)
    in_shape = case.pop("in_shape")
    layer = conv(in_shape, 3, lipschitz_constant=0.9, **case)
    kernel = layer.kernel.numpy()
    # Bring the kernel inside the bound (||A|| <= sqrt(kh * kw) * ||W||_F), so that the
    # layer's response to impulses is the raw operator.
    layer.kernel.assign(kernel * 0.5 / (np.sqrt(kernel[..., 0, 0].size) * np.linalg.norm(kernel)))
    sigma = float(layer.update_lipschitz(**CONVERGE))
    a = operator_matrix(layer, in_shape)
    true = np.linalg.norm(a, 2)
    assert sigma == pytest.approx(true, rel=1e-2)
    if kernel.shape[:2] != (1, 1):  # the reshaped-kernel shortcut would fail this test
        reshaped = np.linalg.norm(layer.kernel.numpy().reshape(-1, 3), 2)
        assert abs(reshaped - true) > 0.04 * true


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: dense(6, 4, stddev=3.0, lipschitz_constant=0.7), (6,)),
        (lambda: conv((4, 4, 2), 3, 3, stddev=3.0, lipschitz_constant=0.7), (4, 4, 2)),
        (lambda: conv((4, 4, 2), 3, 3, stddev=3.0, strides=2, lipschitz_constant=0.7), (4, 4, 2)),
    ],
    ids=["dense", "conv", "conv-stride2"],
)
def test_normalized_operator_is_bounded_and_kernel_kept(make, shape):
    layer = make()
    kernel = layer.kernel.numpy().copy()
    layer(tf.ones((2, *shape), tf.float64), training=True)
    layer.update_lipschitz(**CONVERGE)
    norm = np.linalg.norm(operator_matrix(layer, shape), 2)
    c = layer.lipschitz_constant
    assert norm <= c * (1 + 1e-3)
    assert norm >= c * (1 - 1e-2)  # the raw norm is about 10x larger: the rule did bind
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_layer_inside_bound_is_unchanged():
    layer = dense(4, 3, stddev=0.05, lipschitz_constant=0.9)
    x = tf.random.stateless_normal((5, 4), seed=(1, 2), dtype=tf.float64)
    expected = x.numpy() @ layer.kernel.numpy() + layer.bias.numpy()
    np.testing.assert_array_equal(layer.effective_kernel().numpy(), layer.kernel.numpy())
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-14)


def _brute_force_norm(w, p, q):
    """||A||_{p->q} of the layer's operator A = W^T (W: [2, units]), by brute force."""
    return brute_force_induced_norm_2d(w.T, p, q)


# The four cases (closed forms except (2, 2)), two more closed forms, and two cases
# of the generalized power method with p <= q, where it finds the global maximum here.
MIXED = [(1, 2), (2, np.inf), (1, np.inf), (2, 2), (1, 1), (np.inf, np.inf), (1.5, 3), (3, 3)]


@pytest.mark.parametrize(("p", "q"), MIXED)
@pytest.mark.parametrize("units", [3, 4])
def test_mixed_norm_matches_brute_force(p, q, units):
    layer = dense(2, units, domain=p, codomain=q)
    sigma = float(layer.update_lipschitz(**CONVERGE))
    # The grid resolution (1.6e-5 rad) bounds the brute force's own error far below 1e-3.
    assert sigma == pytest.approx(_brute_force_norm(layer.kernel.numpy(), p, q), rel=1e-3)


CONV_MIXED = {
    "3x3": dict(in_shape=(4, 4, 2), kernel_size=3),
    "3x3-stride2-valid": dict(in_shape=(5, 5, 2), kernel_size=3, strides=2, padding="valid"),
    # Only 2 of 3 kernel rows and columns meet a 2x2 image with stride 2: checks the tap mask.
    "3x3-partial-taps": dict(in_shape=(2, 2, 1), kernel_size=3, strides=2),
    "1x1": dict(in_shape=(3, 3, 2), kernel_size=1),
}


@pytest.mark.parametrize(("p", "q"), [(1, 2), (2, np.inf), (1, np.inf), (1, 1), (3, np.inf)])
@pytest.mark.parametrize("case", CONV_MIXED.values(), ids=CONV_MIXED.keys())
def test_conv_closed_forms_match_explicit_matrix(case, p, q):
    case = dict(case)
    in_shape = case.pop("in_shape")
    layer = conv(in_shape, 3, domain=p, codomain=q, lipschitz_constant=0.99, stddev=3e-3, **case)
    kernel = layer.kernel.numpy()
    kernel[-1, -1] *= 30.0  # the largest entries sit on a tap the partial case never uses
    layer.kernel.assign(kernel)
    a = operator_matrix(layer, in_shape)  # inside the bound: the raw operator
    assert float(layer.sigma()) == pytest.approx(induced_norm(a, p, q), rel=1e-10)


@pytest.mark.parametrize(
    ("kernel_size", "p", "q"),
    [(3, 3, 3), (3, 1.5, 3), (3, 2, 1), (3, np.inf, 2), (1, 3, 1.5), (1, 1.5, 3)],
)
def test_conv_power_method_gives_a_certified_lower_bound(kernel_size, p, q):
    in_shape = (4, 4, 2)
    layer = conv(in_shape, 3, kernel_size, domain=p, codomain=q)
    sigma = float(layer.update_lipschitz(**CONVERGE))
    a = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), in_shape)
    # sigma is attained by the stored v on the explicit operator...
    if kernel_size == 1 and p <= q:  # matrix path: v is one pixel; any pixel attains it
        v = np.zeros(in_shape)
        v[0, 0] = layer.v.numpy()[0]
        v = v.ravel()
    else:
        v = layer.v.numpy().ravel()
    assert sigma == pytest.approx(np.linalg.norm(a @ v, q) / np.linalg.norm(v, p), rel=1e-9)
    # ...and beats 2000 random directions (the power method climbs from any start).
    vs = np.random.default_rng(0).standard_normal((a.shape[1], 2000))
    assert sigma >= np.max(np.linalg.norm(a @ vs, q, axis=0) / np.linalg.norm(vs, p, axis=0))


def test_power_iteration_is_warm_started_and_call_is_pure():
    layer = dense(8, 8, lipschitz_constant=0.5)
    # Close top singular values (1, 0.98, ...) make the power method slow from a cold start.
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    right, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    layer.kernel.assign(left @ np.diag(np.linspace(1.0, 0.86, 8)) @ right)

    def alignment():  # |cos| between v and the top singular vector of A = W^T
        v = layer.v.numpy()[0]
        return abs(v @ left[:, 0]) / np.linalg.norm(v)

    layer.v.assign(rng.standard_normal((1, 8)))  # forget the build-time iterations
    layer.update_lipschitz(1)
    assert alignment() < 0.99  # one step from a random start is far off...
    layer.update_lipschitz(**CONVERGE)
    layer.update_lipschitz(1)
    assert alignment() > 1 - 1e-6  # ...but stays converged from the stored estimate
    u, v = layer.u.numpy(), layer.v.numpy()
    x = tf.ones((3, 8), tf.float64)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return tape.gradient(loss, layer.kernel)

    grad = step(x)
    assert np.all(np.isfinite(grad.numpy()))
    assert np.any(grad.numpy() != 0)
    np.testing.assert_array_equal(layer.u.numpy(), u)
    np.testing.assert_array_equal(layer.v.numpy(), v)


@pytest.mark.parametrize(
    "make", [lambda **kw: conv((6, 6, 2), 3, 3, **kw), lambda **kw: dense(5, 4, **kw)]
)
def test_initial_power_iterations_defer_or_shorten_the_build_time_convergence(make):
    converged = make()  # default: iterates to 1e-6 when built
    deferred = make(initial_power_iterations=0)
    assert deferred.get_config()["initial_power_iterations"] == 0
    assert not np.any(deferred.u.numpy())  # never iterated: u is still its zero initial value
    # The same kernel (seeded initializer): an unconverged estimate is a strict lower bound...
    assert float(deferred.sigma()) < float(converged.sigma()) * (1 - 1e-3)
    # ...until update_lipschitz converges it.
    deferred.update_lipschitz(**CONVERGE)
    assert float(deferred.sigma()) == pytest.approx(float(converged.sigma()), rel=1e-5)
    assert np.any(make(initial_power_iterations=2).u.numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_update_inside_tf_function_matches_eager(jit_compile):
    layer = conv((4, 4, 2), 3, 3, stddev=2.0)
    eager = float(layer.update_lipschitz(**CONVERGE))
    layer.v.assign(np.random.default_rng(1).standard_normal((1, 4, 4, 2)))

    @tf.function(jit_compile=jit_compile)
    def update_and_call(x):
        sigma = layer.update_lipschitz(atol=1e-7, rtol=1e-7, max_iterations=3000)
        return sigma, layer(x)

    sigma, y = update_and_call(tf.ones((2, 4, 4, 2), tf.float64))
    assert float(sigma) == pytest.approx(eager, rel=1e-6)
    assert y.shape == (2, 4, 4, 3)


def test_zero_kernel_gives_zero_sigma_then_recovers():
    layer = SpectralDense(4, kernel_initializer="zeros", dtype="float64")
    layer.build((None, 5))
    assert float(layer.update_lipschitz(**CONVERGE)) == 0.0
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.ones((2, 5), tf.float64)))
    grad = tape.gradient(loss, layer.kernel).numpy()
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0)
    w = np.random.default_rng(0).standard_normal((5, 4))
    layer.kernel.assign(w)
    sigma = float(layer.update_lipschitz(**CONVERGE))
    assert sigma == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)


def test_update_lipschitz_walks_nested_models():
    inner = keras.Sequential([keras.Input((4,)), SpectralDense(6), keras.layers.Dense(6)])
    model = keras.Sequential([keras.Input((4,)), inner, SpectralDense(3, lipschitz_constant=0.5)])
    layers = spectral_layers([model, inner])
    assert [type(layer).__name__ for layer in layers] == ["SpectralDense", "SpectralDense"]
    for layer in layers:
        layer.kernel.assign(layer.kernel * 10.0)
    sigmas = update_lipschitz(model, **CONVERGE)
    assert len(sigmas) == 2
    for layer, sigma in zip(layers, sigmas, strict=True):
        assert float(sigma) == pytest.approx(np.linalg.norm(layer.kernel.numpy(), 2), rel=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: dense(3, 4, domain="inf", codomain=1, atol=1e-4, num_power_iterations=3),
        lambda: conv((5, 5, 2), 3, (3, 1), strides=2, padding="valid", domain=1.5),
    ],
    ids=["dense", "conv"],
)
def test_get_config_round_trips(make):
    layer = make()
    config = layer.get_config()
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert type(clone) is type(layer)
    assert clone.get_config() == config
    assert clone.built  # from the serialized build config
    clone.set_weights(layer.get_weights())
    x = tf.random.stateless_normal((2, *layer.get_build_config()["input_shape"][1:]), (0, 1))
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy(), rtol=1e-12)


def _raises(fn, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn()


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda: SpectralDense(2, lipschitz_constant=0.0), "got 0.0"),
        (lambda: SpectralDense(2, lipschitz_constant=1), "lipschitz_constant must be in (0, 1)"),
        (lambda: SpectralDense(2, lipschitz_constant=1.5), "got 1.5"),
        (lambda: SpectralDense(2, lipschitz_constant=-0.1), "got -0.1"),
        (lambda: SpectralDense(2, domain=0.5), "domain must be a number in [1, inf]"),
        (lambda: SpectralDense(2, codomain="two"), "got 'two'"),
        (lambda: SpectralConv2D(2, 3, codomain=float("nan")), "got nan"),
        (lambda: SpectralDense(2, num_power_iterations=0), "num_power_iterations"),
        (lambda: SpectralDense(2, num_power_iterations=-3), "got -3"),
        (lambda: SpectralDense(2, max_iterations=2.5), "max_iterations"),
        (lambda: SpectralDense(2, initial_power_iterations=-1), "initial_power_iterations"),
        (lambda: SpectralConv2D(2, 3, initial_power_iterations=1.0), "got 1.0"),
        (lambda: SpectralDense(2, atol=-1.0), "atol must be a non-negative"),
        (lambda: SpectralDense(0), "units must be a positive integer; got 0"),
        (lambda: SpectralConv2D(2, 0), "kernel_size"),
        (lambda: SpectralConv2D(2, 3, strides=(1, 0)), "strides"),
        (lambda: SpectralConv2D(2, 3, padding="causal"), "got 'causal'"),
        (lambda: dense(3, 2).update_lipschitz(0), "num_iterations"),
        (lambda: dense(3, 2).update_lipschitz(rtol=-0.5), "got -0.5"),
        (lambda: dense(3, 2).update_lipschitz(max_iterations=-1), "got -1"),
        (lambda: dense(3, 2).update_lipschitz(5, atol=1e-3), "not both"),
        (lambda: SpectralConv2D(2, 3).build((None, None, None, 3)), "full input shape"),
        (lambda: conv((2, 2, 1), 2, 3, padding="valid"), "larger than the input"),
    ],
)
def test_bad_arguments_raise(fn, message):
    _raises(fn, message)


# Learnable orders


def learnable_dense(p, q, units=3, n_in=2, **kwargs):
    domain = NormOrder(p, dtype="float64")
    codomain = domain if q == "same" else NormOrder(q, dtype="float64")
    return dense(n_in, units, domain=domain, codomain=codomain, **kwargs), domain, codomain


@pytest.mark.parametrize(("p", "q"), [(1.5, 3), (2, 2), (3, 3), (2, 4.5)])
def test_learnable_orders_converge_to_the_brute_force_norm(p, q):
    layer, domain, codomain = learnable_dense(p, q)
    assert {id(o) for o in layer.learnable_orders} == {id(domain), id(codomain)}
    # Move the orders away from their start, as training would, then re-converge.
    domain.logit.assign_add(0.1)
    codomain.logit.assign_sub(0.1)
    p, q = float(domain.order()), float(codomain.order())
    sigma = float(layer.update_lipschitz(**CONVERGE))
    assert sigma == pytest.approx(_brute_force_norm(layer.kernel.numpy(), p, q), rel=1e-3)
    assert float(layer.sigma()) == pytest.approx(sigma, rel=1e-12)


def _finite_difference(fn, order, h=1e-4):
    """d fn(p(t)) / dt at the order's logit t, by central differences (float64)."""
    t = float(order.logit)
    values = [fn(float(order_of_logit(tf.constant(t + s, tf.float64)))) for s in (h, -h)]
    return (values[0] - values[1]) / (2 * h)


@pytest.mark.parametrize(("p", "q"), [(1.5, 3), (2.5, 2.5), (3, 1.5)])
def test_order_gradient_is_the_gradient_of_the_true_norm(p, q):
    # At a converged v the ratio's gradient in (p, q) is the norm's (envelope theorem): the
    # brute-force norm, differentiated numerically, is the independent reference.
    layer, domain, codomain = learnable_dense(p, q)
    layer.update_lipschitz(**CONVERGE)
    w = layer.kernel.numpy()
    with tf.GradientTape() as tape:
        sigma = layer.sigma_of_orders()
    grads = tape.gradient(sigma, [domain.logit, codomain.logit])
    p, q = float(domain.order()), float(codomain.order())
    expected_p = _finite_difference(lambda r: _brute_force_norm(w, r, q), domain)
    expected_q = _finite_difference(lambda r: _brute_force_norm(w, p, r), codomain)
    assert float(grads[0]) == pytest.approx(expected_p, rel=1e-3)
    assert float(grads[1]) == pytest.approx(expected_q, rel=1e-3)
    assert expected_p > 0 > expected_q  # smaller p and larger q shrink the norm


@pytest.mark.parametrize(
    "make",
    [
        lambda o: dense(3, 4, domain=1, codomain=o),
        lambda o: conv((3, 3, 2), 2, 3, domain=o, codomain="inf"),
    ],
)
def test_closed_form_with_one_learnable_order_has_the_exact_gradient(make):
    order = NormOrder(2.5, dtype="float64")
    layer = make(order)
    if isinstance(layer, SpectralConv2D):
        a = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), (3, 3, 2))
        norm = lambda r: induced_norm(a, r, np.inf)  # noqa: E731
    else:
        norm = lambda r: induced_norm(layer.kernel.numpy().T, 1, r)  # noqa: E731
    with tf.GradientTape() as tape:
        sigma = layer.sigma_of_orders()
    assert float(sigma) == pytest.approx(norm(float(order.order())), rel=1e-10)
    assert float(tape.gradient(sigma, order.logit)) == pytest.approx(
        _finite_difference(norm, order), rel=1e-5
    )


def test_only_the_order_objective_reaches_the_orders():
    layer, domain, codomain = learnable_dense(1.5, 3, units=4, n_in=3, stddev=3.0)
    x = tf.random.stateless_normal((5, 3), (0, 2), dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        y = tf.reduce_sum(layer(x) ** 2)
        loss = norm_order_loss([layer])
    assert tape.gradient(y, [domain.logit, codomain.logit]) == [None, None]
    assert tape.gradient(loss, layer.kernel) is None
    assert all(g is not None for g in tape.gradient(loss, [domain.logit, codomain.logit]))
    assert float(loss) == float(layer.sigma_of_orders())
    assert norm_order_loss([dense(3, 2)]) is None  # fixed orders: nothing to learn


def test_order_loss_averages_over_layers_and_a_shared_order_counts_once():
    shared = NormOrder(3.0, dtype="float64")
    first = dense(2, 3, domain=NormOrder(1.5, dtype="float64"), codomain=shared)
    second = dense(3, 2, domain=shared, codomain=shared)
    assert second.learnable_orders == [shared]
    loss = norm_order_loss([first, second, dense(2, 2)])
    expected = (float(first.sigma_of_orders()) + float(second.sigma_of_orders())) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-12)


def test_learnable_1x1_conv_uses_the_operator_since_orders_may_cross():
    in_shape = (4, 4, 2)
    layer = conv(in_shape, 3, 1, domain=NormOrder(3.0), codomain=NormOrder(1.5))
    assert layer.v.shape == (1, *in_shape)  # the image, not one pixel
    sigma = float(layer.update_lipschitz(**CONVERGE))
    a = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), in_shape)
    p, q = 3.0, 1.5
    matrix = operator_matrix(lambda x: tf.nn.conv2d(x, layer.kernel, 1, "SAME"), (1, 1, 2))
    vs = np.random.default_rng(1).standard_normal((a.shape[1], 2000))
    assert sigma >= np.max(np.linalg.norm(a @ vs, q, axis=0) / np.linalg.norm(vs, p, axis=0))
    # With p > q the operator's norm exceeds the matrix's (16 pixels: by up to 16**(1/q - 1/p)).
    vm = np.random.default_rng(2).standard_normal((2, 20000))
    matrix_norm = np.max(np.linalg.norm(matrix @ vm, q, axis=0) / np.linalg.norm(vm, p, axis=0))
    assert sigma > 1.5 * matrix_norm


def test_zero_kernel_gives_finite_order_gradients():
    layer, domain, codomain = learnable_dense(1.5, 3, stddev=0.0)
    with tf.GradientTape() as tape:
        loss = norm_order_loss([layer])
    grads = tape.gradient(loss, [domain.logit, codomain.logit])
    assert float(loss) == 0.0
    assert all(np.isfinite(float(g)) for g in grads)


def test_learnable_get_config_round_trips():
    layer, domain, _ = learnable_dense(1.5, 3, units=4, n_in=3)
    domain.logit.assign(0.3)
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    clone = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(clone.domain, NormOrder)
    assert clone.domain is not domain
    assert clone.domain.initial_order == 1.5
    assert clone.codomain.initial_order == 3.0
    clone.set_weights(layer.get_weights())  # the logits are among the weights
    assert float(clone.domain.order()) == pytest.approx(float(domain.order()), rel=1e-12)
    x = tf.random.stateless_normal((2, 3), (0, 1), dtype=tf.float64)
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy(), rtol=1e-12)


def test_learnable_update_inside_xla_matches_eager():
    eager, domain, codomain = learnable_dense(1.5, 3, units=5, n_in=4)
    compiled = dense(
        4, 5, domain=NormOrder(1.5, dtype="float64"), codomain=NormOrder(3.0, dtype="float64")
    )
    compiled.set_weights(eager.get_weights())
    expected = eager.update_lipschitz(7)
    got = tf.function(lambda: compiled.update_lipschitz(7), jit_compile=True)()
    assert float(got) == pytest.approx(float(expected), rel=1e-10)
    np.testing.assert_allclose(compiled.v.numpy(), eager.v.numpy(), rtol=1e-8, atol=1e-12)
