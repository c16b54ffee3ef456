"""Tests of operator_norm: the layers' norms against independent numpy ground truth.

The norms are computed through `SpectralDense` and `SpectralConv2D`, which hold the kernels
and the power method's estimates; the references are explicit matrices and brute force.
"""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from checks import brute_force_induced_norm_2d
from spectral_checks import CONVERGE, conv, dense, learnable_dense, operator_matrix

from tfp_resflow.layers import operator_norm
from tfp_resflow.layers.lipschitz import SpectralConv2D, SpectralDense, norm_order_loss
from tfp_resflow.layers.norm_order import NormOrder, order_of_logit


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


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


def test_zero_kernel_gives_finite_order_gradients():
    layer, domain, codomain = learnable_dense(1.5, 3, stddev=0.0)
    with tf.GradientTape() as tape:
        loss = norm_order_loss([layer])
    grads = tape.gradient(loss, [domain.logit, codomain.logit])
    assert float(loss) == 0.0
    assert all(np.isfinite(float(g)) for g in grads)


# The module's functions directly


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (2.5, 2.5), (math.inf, math.inf), ("inf", math.inf), ("Infinity", math.inf)],
)
def test_check_order_accepts_numbers_from_one_to_inf(value, expected):
    assert operator_norm.check_order("p", value) == expected


@pytest.mark.parametrize("bad", [0.5, 0, -math.inf, math.nan, "two", True, None])
def test_check_order_rejects_everything_else(bad):
    message = f"p must be a number in [1, inf] or 'inf'; got {bad!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        operator_norm.check_order("p", bad)


@pytest.mark.parametrize("r", [1.0, 1.5, 2.0, 3.0, 7.0])
def test_duality_map_is_the_equality_case_of_hoelder(r):
    y = tf.constant(np.random.default_rng(4).standard_normal(7) * 1e3)
    z = operator_norm._dualize(y, r, tf.zeros_like(y)).numpy()
    r_dual = np.inf if r == 1 else r / (r - 1)
    assert np.linalg.norm(z, r_dual) == pytest.approx(1.0, rel=1e-12)
    assert float(np.dot(z, y.numpy())) == pytest.approx(np.linalg.norm(y.numpy(), r), rel=1e-12)


@pytest.mark.parametrize(("p", "q"), [(1.5, 3), (3, 1.5), (math.inf, 2), (2, 1), (2, 2)])
def test_each_power_step_never_lowers_sigma(p, q):
    # Hoelder's inequality, used twice (module docs), from a random start, step by step.
    rng = np.random.default_rng(3)
    op = operator_norm.MatrixOperator(6, 5)
    kernel = tf.constant(rng.standard_normal((6, 5)))
    u, v = tf.zeros(op.u_shape, tf.float64), tf.constant(rng.standard_normal(op.v_shape))
    sigmas = [float(operator_norm.norm_ratio(op, kernel, v, float(p), float(q)))]
    for _ in range(20):
        u, v, sigma = operator_norm.power_method(
            op, kernel, u, v, float(p), float(q), atol=None, rtol=None, max_iterations=1
        )
        sigmas.append(float(sigma))
    assert all(b >= a * (1 - 1e-12) for a, b in zip(sigmas, sigmas[1:], strict=False))
    assert sigmas[-1] > sigmas[0]
