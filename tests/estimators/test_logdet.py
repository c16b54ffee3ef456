"""Tests of `logdet`: exact values, unbiasedness, Neumann gradients, modes, errors.

Statistical tests use fixed seeds (so they are deterministic) and compare the mean of many
independent draws with the exact answer, allowing 4 standard errors per component: a correct
estimator fails such a check with probability about 6e-5 per component, while a wrong weight,
sign or off-by-one shifts the mean by many standard errors (see `test_truncated_series_is_biased`
for a shift of the size a dropped term causes).
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_resflow.estimators import logdet

NUM_DRAWS = 2000

# ------------------------------------------------------------------------------------------------
# Residual functions with known Jacobians.


def dense_tanh_params(event_size: int, lipschitz: float, seed: int, dtype=np.float64):
    """W, b of g(x) = tanh(x W + b) with ||W||_2 = lipschitz, so Lip(g) <= lipschitz."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(event_size, event_size))
    w *= lipschitz / np.linalg.norm(w, 2)
    b = 0.1 * rng.normal(size=event_size)
    return w.astype(dtype), b.astype(dtype)


def numpy_dense_tanh_log_det(x, w, b):
    """Independent float64 reference: J_ij = (1 - tanh(x W + b)_i**2) W_ji, then slogdet."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    t = np.tanh(x @ w + b)
    out = []
    for i in range(len(x)):
        jac = (1.0 - t[i] ** 2)[:, None] * w.T
        out.append(np.linalg.slogdet(np.eye(len(w)) + jac)[1])
    return np.array(out)


def make_dense_tanh(w, b, event_shape):
    """g on events of `event_shape`: flatten, tanh(x W + b), reshape back."""

    def g(x):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        y = tf.tanh(flat @ tf.constant(w, x.dtype) + tf.constant(b, x.dtype))
        return tf.reshape(y, tf.shape(x))

    return g


def keras_contraction(event_size=4, lipschitz=0.9, seed=2, dtype="float64", symmetric=False):
    """A Keras Dense+tanh layer with ||W||_2 = lipschitz: a `g` whose weights are variables.

    Seed 2 gives Jacobians with spectral radius about 0.53 at the test inputs, below
    sqrt(1 - 0.5), so the geometric(0.5) roulette has finite variance. `symmetric=True` gives
    W = Q diag(lipschitz, ...) Q^T instead, whose eigenvalues are as large as its norm: the
    slowest-converging series for a given Lipschitz constant.
    """
    w, b = dense_tanh_params(event_size, lipschitz, seed)
    if symmetric:
        q, _ = np.linalg.qr(w)
        w = q @ np.diag(np.linspace(lipschitz, lipschitz / 2, event_size)) @ q.T
    layer = keras.layers.Dense(event_size, activation="tanh", dtype=dtype)
    layer.build((None, event_size))
    layer.kernel.assign(w)
    layer.bias.assign(b)
    return layer


def sample_inputs(batch=3, event_size=4, seed=7, dtype=np.float64):
    return tf.constant(0.5 * np.random.default_rng(seed).normal(size=(batch, event_size)), dtype)


def conv_contraction(channels: int, lipschitz: float, seed: int):
    """g(x) = tanh(conv3x3(x)) on [B, H, W, C], the conv's operator norm scaled to `lipschitz`."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(3, 3, channels, channels))

    def conv(x, k):
        return tf.nn.conv2d(x, tf.constant(k, x.dtype), strides=1, padding="SAME")

    def operator_norm(k, shape):  # largest singular value of the conv as a matrix
        size = int(np.prod(shape))
        impulses = tf.reshape(tf.eye(size, dtype=tf.float64), [size, *shape])
        matrix = tf.reshape(conv(impulses, k), [size, size]).numpy()
        return np.linalg.norm(matrix, 2)

    def make(shape):
        k = kernel * lipschitz / operator_norm(kernel, shape)
        return lambda x: tf.tanh(conv(x, k))

    return make


def finite_difference_log_det(g, x, eps=1e-6):
    """Reference log|det(I + J)| from a float64 central-difference Jacobian (no autodiff)."""
    x = np.asarray(x, np.float64)
    batch, size = x.shape[0], int(np.prod(x.shape[1:]))
    flat = x.reshape(batch, size)
    out = []
    for i in range(batch):
        jac = np.zeros((size, size))
        for j in range(size):
            step = np.zeros(size)
            step[j] = eps
            plus = g(tf.constant((flat[i] + step).reshape(1, *x.shape[1:]))).numpy().ravel()
            minus = g(tf.constant((flat[i] - step).reshape(1, *x.shape[1:]))).numpy().ravel()
            jac[:, j] = (plus - minus) / (2 * eps)
        out.append(np.linalg.slogdet(np.eye(size) + jac)[1])
    return np.array(out)


def draws_of(fn, num_draws=NUM_DRAWS):
    """Stacks `fn(seed)` over seeds [1, 0..num_draws-1], with fn compiled once."""
    compiled = tf.function(fn)
    return np.stack([compiled(tf.constant([1, i])) for i in range(num_draws)])


def assert_mean_within(draws, expected, num_standard_errors=4.0):
    mean = draws.mean(axis=0)
    standard_error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(standard_error > 0), "degenerate draws: the estimator is not random"
    z = np.abs(mean - expected) / standard_error
    assert np.all(z < num_standard_errors), (
        f"mean {mean} vs expected {expected}: {z} standard errors"
    )


# ------------------------------------------------------------------------------------------------
# exact_log_det


@pytest.mark.parametrize("event_size", [1, 2, 5, 10])
@pytest.mark.parametrize(("dtype", "atol"), [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_exact_log_det_matches_numpy_determinant(event_size, dtype, atol):
    w, b = dense_tanh_params(event_size, 0.9, seed=event_size)
    x = np.random.default_rng(0).normal(size=(4, event_size))
    g = make_dense_tanh(w, b, (event_size,))
    gx, log_det = logdet.exact_log_det(g, tf.constant(x, dtype))
    assert log_det.shape == (4,)
    assert log_det.dtype == dtype
    np.testing.assert_allclose(gx, np.tanh(x @ w + b), atol=atol)
    np.testing.assert_allclose(log_det, numpy_dense_tanh_log_det(x, w, b), atol=atol)


def test_exact_log_det_on_image_event_with_dense_map():
    shape = (2, 3, 2)  # [H, W, C]
    size = int(np.prod(shape))
    w, b = dense_tanh_params(size, 0.9, seed=3)
    x = np.random.default_rng(1).normal(size=(3, *shape))
    _, log_det = logdet.exact_log_det(make_dense_tanh(w, b, shape), tf.constant(x))
    np.testing.assert_allclose(log_det, numpy_dense_tanh_log_det(x, w, b), atol=1e-10)


def test_exact_log_det_on_image_event_with_conv_map():
    shape = (3, 3, 2)
    g = conv_contraction(channels=2, lipschitz=0.9, seed=0)(shape)
    x = np.random.default_rng(2).normal(size=(2, *shape))
    _, log_det = logdet.exact_log_det(g, tf.constant(x))
    # Central differences in float64 are accurate to about eps**2 = 1e-12 per entry.
    np.testing.assert_allclose(log_det, finite_difference_log_det(g, x), atol=1e-7)


def test_exact_log_det_gradient_matches_numpy_finite_differences():
    w, b = dense_tanh_params(3, 0.9, seed=1)
    x = np.random.default_rng(3).normal(size=(2, 3))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(logdet.exact_log_det(make_dense_tanh(w, b, (3,)), xt)[1])
    grad = tape.gradient(total, xt).numpy()
    eps = 1e-6
    expected = np.zeros_like(x)
    for i in range(2):
        for j in range(3):
            step = np.zeros_like(x)
            step[i, j] = eps
            plus = numpy_dense_tanh_log_det(x + step, w, b).sum()
            minus = numpy_dense_tanh_log_det(x - step, w, b).sum()
            expected[i, j] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(grad, expected, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Unbiasedness of the Russian-roulette estimator; bias of the truncated series.

ROULETTE_CASES = {
    "geometric-gaussian": dict(term_distribution="geometric", geometric_p=0.5, probe="gaussian"),
    "geometric-rademacher": dict(
        term_distribution="geometric", geometric_p=0.5, probe="rademacher"
    ),
    "poisson-gaussian": dict(term_distribution="poisson", poisson_rate=2.0, probe="gaussian"),
    "poisson-rademacher": dict(term_distribution="poisson", poisson_rate=2.0, probe="rademacher"),
    "geometric-no-exact-terms": dict(
        term_distribution="geometric", geometric_p=0.6, num_exact_terms=0
    ),
    "poisson-one-exact-term-two-probes": dict(
        term_distribution="poisson", poisson_rate=1.5, num_exact_terms=1, num_probes=2
    ),
}


@pytest.mark.parametrize("options", ROULETTE_CASES.values(), ids=ROULETTE_CASES.keys())
def test_russian_roulette_is_unbiased(options):
    g = keras_contraction()
    x = sample_inputs()
    _, exact = logdet.exact_log_det(g, x)
    draws = draws_of(lambda seed: logdet.russian_roulette_log_det(g, x, seed=seed, **options)[1])
    assert_mean_within(draws, exact.numpy())


def test_russian_roulette_is_unbiased_on_images():
    shape = (3, 3, 1)
    g = conv_contraction(channels=1, lipschitz=0.9, seed=4)(shape)
    x = tf.constant(np.random.default_rng(5).normal(size=(2, *shape)))
    _, exact = logdet.exact_log_det(g, x)
    draws = draws_of(
        lambda seed: logdet.russian_roulette_log_det(
            g, x, seed=seed, term_distribution="poisson", poisson_rate=2.0
        )[1]
    )
    assert draws.shape == (NUM_DRAWS, 2)
    assert_mean_within(draws, exact.numpy())


def exact_truncated_series(g, x, num_terms):
    """sum_{k<=n} (-1)^(k+1) tr(J^k) / k from the full Jacobian (float64 numpy)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = g(x)
    jac = tape.batch_jacobian(gx, x).numpy()
    out = np.zeros(len(jac))
    for i, j in enumerate(jac):
        power = np.eye(len(j))
        for k in range(1, num_terms + 1):
            power = power @ j
            out[i] += (-1) ** (k + 1) * np.trace(power) / k
    return out


@pytest.mark.parametrize("num_terms", [1, 2])
def test_truncated_series_is_biased(num_terms):
    g = keras_contraction(symmetric=True)
    x = sample_inputs()
    _, exact = logdet.exact_log_det(g, x)
    draws = draws_of(
        lambda seed: logdet.power_series_log_det(g, x, seed=seed, num_terms=num_terms)[1]
    )
    # It estimates its own truncation without bias...
    assert_mean_within(draws, exact_truncated_series(g, x, num_terms))
    # ...which is many standard errors away from the log-det.
    standard_error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - exact.numpy()) > 4 * standard_error)


def test_power_series_converges_to_exact_with_many_terms():
    g = keras_contraction(lipschitz=0.5)
    x = sample_inputs()
    _, exact = logdet.exact_log_det(g, x)
    # With Lip(g) = 0.5 the tail after 60 terms is below 0.5**61 * 4 ~ 2e-18; averaging 400
    # probes at once leaves only the Hutchinson noise, checked against its own spread.
    draws = draws_of(
        lambda seed: logdet.power_series_log_det(g, x, seed=seed, num_terms=60, num_probes=20)[1],
        num_draws=20,
    )
    assert_mean_within(draws, exact.numpy())


# ------------------------------------------------------------------------------------------------
# The Neumann gradient.


def loss_and_gradients(estimator, g, x, weights, **options):
    """Gradients of sum_b weights[b] * log_det[b] w.r.t. x and g's variables."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        _, log_det = estimator(g, x, **options)
        loss = tf.reduce_sum(weights * log_det)
    return tape.gradient(loss, [x, *g.trainable_weights])


def flat(tensors):
    return np.concatenate([np.ravel(t) for t in tensors])


GRADIENT_CASES = {
    "neumann-geometric-rademacher": dict(term_distribution="geometric", probe="rademacher"),
    "neumann-poisson-gaussian": dict(term_distribution="poisson", probe="gaussian"),
    "neumann-poisson-two-probes": dict(term_distribution="poisson", num_probes=2),
    "plain-geometric": dict(term_distribution="geometric", neumann_gradient=False),
}


@pytest.mark.parametrize("options", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_gradient_is_unbiased(options):
    g = keras_contraction()
    x = sample_inputs()
    # Unequal per-example weights: each example's log-det gradient must keep its own weight.
    weights = tf.constant([1.0, -2.0, 0.5], tf.float64)
    expected = flat(loss_and_gradients(logdet.exact_log_det, g, x, weights))
    draws = draws_of(
        lambda seed: tf.concat(
            [
                tf.reshape(t, [-1])
                for t in loss_and_gradients(
                    logdet.russian_roulette_log_det, g, x, weights, seed=seed, **options
                )
            ],
            axis=0,
        )
    )
    assert draws.shape == (NUM_DRAWS, expected.size)
    assert_mean_within(draws, expected)


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_neumann_value_equals_plain_value_for_a_seed(distribution):
    g = keras_contraction()
    x = sample_inputs()
    for seed in range(5):
        estimate = functools.partial(
            logdet.russian_roulette_log_det, g, x, seed=seed, term_distribution=distribution
        )
        neumann_gx, neumann = estimate(neumann_gradient=True)
        plain_gx, plain = estimate(neumann_gradient=False)
        np.testing.assert_allclose(neumann, plain, rtol=1e-12)
        np.testing.assert_allclose(neumann_gx, plain_gx, rtol=1e-12)


def test_neumann_backward_passes_the_gradient_of_g_exactly():
    g = keras_contraction()
    x = sample_inputs()
    upstream = tf.constant(np.random.default_rng(0).normal(size=(3, 4)))

    def gradients(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn() * upstream)
        return flat(tape.gradient(loss, [x, *g.trainable_weights]))

    through_estimator = gradients(lambda: logdet.russian_roulette_log_det(g, x, seed=1)[0])
    direct = gradients(lambda: g(x))
    np.testing.assert_allclose(through_estimator, direct, rtol=1e-12)


def test_neumann_gradient_on_images_matches_exact_in_the_mean():
    shape = (2, 2, 1)
    make = conv_contraction(channels=1, lipschitz=0.8, seed=6)
    g = make(shape)
    x = tf.constant(np.random.default_rng(8).normal(size=(2, *shape)))

    def grad_x(estimator, **options):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(estimator(g, x, **options)[1])
        return tape.gradient(loss, x)

    expected = grad_x(logdet.exact_log_det).numpy().ravel()
    draws = draws_of(
        lambda seed: tf.reshape(grad_x(logdet.russian_roulette_log_det, seed=seed), [-1])
    )
    assert_mean_within(draws, expected)


def test_truncated_neumann_gradient_matches_gradient_of_truncated_series():
    g = keras_contraction()
    x = sample_inputs()
    weights = tf.ones([3], tf.float64)
    estimate = functools.partial(logdet.power_series_log_det, num_terms=3, num_probes=1)
    plain = draws_of(
        lambda seed: tf.concat(
            [tf.reshape(t, [-1]) for t in loss_and_gradients(estimate, g, x, weights, seed=seed)],
            0,
        ),
        num_draws=1000,
    )
    neumann = draws_of(
        lambda seed: tf.concat(
            [
                tf.reshape(t, [-1])
                for t in loss_and_gradients(
                    estimate, g, x, weights, seed=seed, neumann_gradient=True
                )
            ],
            0,
        ),
        num_draws=1000,
    )
    # Both estimate the gradient of the expected truncated series; compare their means with
    # the standard error of the difference of two independent means.
    standard_error = np.sqrt(
        plain.var(axis=0, ddof=1) / len(plain) + neumann.var(axis=0, ddof=1) / len(neumann)
    )
    assert np.all(np.abs(plain.mean(0) - neumann.mean(0)) < 4 * standard_error)


@pytest.mark.parametrize("num_probes", [1, 2])
@pytest.mark.parametrize("backward_slice_size", [1, 2, 3, 4])
def test_backward_in_slices_of_the_batch_gives_the_same_gradients(backward_slice_size, num_probes):
    # 5 examples (times the probes) in slices of at most 1-4 rows (padded slices included); the
    # loss reads g(x) and the log-det, so both parts of the surrogate are sliced. The
    # variables' gradients come from the tape inside the slices' loop, the parameters' from
    # `stateless_call`'s tensors.
    g = keras_contraction()
    x = sample_inputs(batch=5)
    weights = tf.constant([1.0, -2.0, 3.0, 0.5, 1.5], tf.float64)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(5, 4)))
    params = [tf.identity(w) for w in g.trainable_weights]

    def gradients(slice_size, by_parameters):
        fn, sources = (g, g.trainable_weights)
        options = {}
        if by_parameters:
            fn, sources = (lambda t: g.stateless_call(params, [], t)[0]), params
            options["parameters"] = params
        with tf.GradientTape() as tape:
            tape.watch([x, *params])
            gx, log_det = logdet.russian_roulette_log_det(
                fn, x, seed=4, num_probes=num_probes, backward_slice_size=slice_size, **options
            )
            loss = tf.reduce_sum(weights * log_det) + tf.reduce_sum(gx * upstream)
        return [loss, *tape.gradient(loss, [x, *sources])]

    for by_parameters in (False, True):
        whole = flat(gradients(None, by_parameters))
        for wrap in MODES.values():
            sliced = flat(wrap(lambda: gradients(backward_slice_size, by_parameters))())  # noqa: B023
            np.testing.assert_allclose(sliced, whole, rtol=1e-12, atol=1e-12)


def test_backward_in_slices_takes_an_empty_batch():
    # An unknown batch size that turns out to be 0: one empty slice, empty gradients for x.
    g = keras_contraction()

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float64)])
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            gx, log_det = logdet.russian_roulette_log_det(g, x, seed=1, backward_slice_size=2)
            loss = tf.reduce_sum(log_det) + tf.reduce_sum(gx)
        return tape.gradient(loss, [x, *g.trainable_weights])

    grads = gradients(tf.zeros([0, 4], tf.float64))
    assert grads[0].shape == (0, 4)
    assert all(np.all(t.numpy() == 0) for t in grads[1:])


# ------------------------------------------------------------------------------------------------
# Randomness: seeds, modes and freshness.

MODES = {
    "eager": lambda f: f,
    "function": tf.function,
    "xla": functools.partial(tf.function, jit_compile=True),
}

ESTIMATORS = {
    "exact": logdet.exact_log_det,
    "truncated": functools.partial(logdet.power_series_log_det, num_terms=4),
    "truncated-neumann": functools.partial(
        logdet.power_series_log_det, num_terms=4, neumann_gradient=True
    ),
    "geometric": functools.partial(logdet.russian_roulette_log_det, probe="gaussian"),
    "geometric-plain": functools.partial(logdet.russian_roulette_log_det, neumann_gradient=False),
    "poisson": functools.partial(
        logdet.russian_roulette_log_det, term_distribution="poisson", num_probes=2
    ),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ESTIMATORS.keys())
def test_same_seed_same_value_in_eager_function_and_xla(name, dtype):
    estimator = ESTIMATORS[name]
    g = keras_contraction(dtype=np.dtype(dtype).name)
    x = sample_inputs(dtype=dtype)
    values = {}
    for mode, wrap in MODES.items():
        values[mode] = [
            wrap(lambda s: estimator(g, x, seed=s)[1])(tf.constant([3, seed])).numpy()
            for seed in range(3)
        ]
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    for mode in ("function", "xla"):
        np.testing.assert_allclose(values[mode], values["eager"], rtol=rtol, atol=rtol)
    if name != "exact":  # different seeds give different estimates
        assert not np.allclose(values["eager"][0], values["eager"][1])


@pytest.mark.parametrize("name", ["geometric", "truncated-neumann"])
def test_neumann_gradient_is_the_same_in_eager_function_and_xla(name):
    estimator = ESTIMATORS[name]
    g = keras_contraction()
    x = sample_inputs()
    weights = tf.constant([1.0, 2.0, 3.0], tf.float64)

    def gradients(seed):
        return loss_and_gradients(estimator, g, x, weights, seed=seed)

    results = [flat(wrap(gradients)(tf.constant([0, 9]))) for wrap in MODES.values()]
    np.testing.assert_allclose(results[1], results[0], rtol=1e-10)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-10)


def test_no_seed_gives_fresh_estimates_inside_tf_function():
    g = keras_contraction()
    x = sample_inputs()
    # Gaussian probes: with 12 Rademacher signs two fresh draws can coincide by chance.
    estimate = tf.function(lambda: logdet.russian_roulette_log_det(g, x, probe="gaussian")[1])
    values = np.stack([estimate().numpy() for _ in range(5)])
    # NumPy-style draws would freeze at trace time and repeat one value.
    assert len({tuple(v) for v in values.round(12)}) == 5


def test_int_seed_and_pair_seed_are_reproducible():
    g = keras_contraction()
    x = sample_inputs()
    first = logdet.russian_roulette_log_det(g, x, seed=11)[1]
    again = logdet.russian_roulette_log_det(g, x, seed=11)[1]
    np.testing.assert_array_equal(first, again)
    pair = logdet.russian_roulette_log_det(g, x, seed=(0, 11))[1]
    np.testing.assert_array_equal(first, pair)


# ------------------------------------------------------------------------------------------------
# Bad arguments.

BAD_ARGUMENTS = [
    (
        logdet.russian_roulette_log_det,
        dict(geometric_p=0.0),
        "geometric_p must be a number in \\(0, 1\\); got 0.0",
    ),
    (
        logdet.russian_roulette_log_det,
        dict(geometric_p=1.0),
        "geometric_p must be a number in \\(0, 1\\); got 1.0",
    ),
    (
        logdet.russian_roulette_log_det,
        dict(geometric_p=-0.2),
        "geometric_p must be a number in \\(0, 1\\); got -0.2",
    ),
    (
        logdet.russian_roulette_log_det,
        dict(poisson_rate=0.0),
        "poisson_rate must be a number > 0; got 0.0",
    ),
    (
        logdet.russian_roulette_log_det,
        dict(poisson_rate=-1.0),
        "poisson_rate must be a number > 0; got -1.0",
    ),
    (logdet.russian_roulette_log_det, dict(num_exact_terms=-1), "num_exact_terms .* got -1"),
    (logdet.russian_roulette_log_det, dict(num_exact_terms=1.5), "num_exact_terms .* got 1.5"),
    (
        logdet.russian_roulette_log_det,
        dict(term_distribution="uniform"),
        "term_distribution .*'uniform'",
    ),
    (logdet.russian_roulette_log_det, dict(probe="sphere"), "probe .* got 'sphere'"),
    (logdet.russian_roulette_log_det, dict(num_probes=0), "num_probes .* got 0"),
    (logdet.russian_roulette_log_det, dict(backward_slice_size=0), "backward_slice_size .* got 0"),
    (logdet.power_series_log_det, dict(backward_slice_size=1.5), "backward_slice_size .* got 1.5"),
    (logdet.power_series_log_det, dict(num_terms=0), "num_terms must .* got 0"),
    (logdet.power_series_log_det, dict(num_terms=-3), "num_terms must .* got -3"),
    (logdet.power_series_log_det, dict(probe="normal"), "probe .* got 'normal'"),
    (logdet.russian_roulette_log_det, dict(seed=(1, 2, 3)), "seed must .* shape"),
]


@pytest.mark.parametrize(("estimator", "options", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_the_value(estimator, options, message):
    with pytest.raises(ValueError, match=message):
        estimator(keras_contraction(), sample_inputs(), **options)


@pytest.mark.parametrize(
    "estimator",
    [logdet.exact_log_det, logdet.power_series_log_det, logdet.russian_roulette_log_det],
)
def test_input_without_batch_axis_is_rejected(estimator):
    with pytest.raises(ValueError, match=r"x must have shape \[batch, \*event_shape\]"):
        estimator(tf.tanh, tf.constant([0.1, 0.2]))
