"""Tests of `tfp_resflow.data.conditional_data`: rotated toys and the two-moons simulator."""

import numpy as np
import pytest
from scipy import stats

from tfp_resflow.data import conditional_data as cd

THETAS = [(0.3, -0.5), (-0.8, 0.1), (0.0, 0.0), (0.95, 0.9)]


def integral_around_crescent(theta, h=0.0005):
    """Midpoint rule of p(x | theta) over a square holding the whole crescent."""
    shift = cd.two_moons_shift(np.array([theta]))[0]
    grid = np.arange(-0.2, 0.2, h) + h / 2
    x = np.stack(np.meshgrid(grid + 0.25 + shift[0], grid + shift[1], indexing="ij"), -1)
    return np.exp(cd.two_moons_log_likelihood(x, np.array(theta))).sum() * h * h


@pytest.mark.parametrize("theta", THETAS)
def test_likelihood_integrates_to_one(theta):
    assert integral_around_crescent(theta) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("theta", THETAS[:2])
def test_simulations_follow_the_likelihood(theta):
    """Chi-square test of a histogram of simulations against the likelihood's bin masses."""
    n, bins = 20_000, 20
    x = cd.two_moons_simulate(np.repeat([theta], n, axis=0), seed=7).astype(np.float64)
    shift = cd.two_moons_shift(np.array([theta]))[0]
    low, high = shift + [0.25 - 0.15, -0.15], shift + [0.25 + 0.15, 0.15]
    edges = [np.linspace(low[k], high[k], bins + 1) for k in range(2)]
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=edges)
    assert counts.sum() == n  # every simulation falls inside the square
    per_bin = 15  # midpoint rule inside each bin, h = 0.001
    h = 0.3 / (bins * per_bin)
    fine = [low[k] + h * (np.arange(bins * per_bin) + 0.5) for k in range(2)]
    grid = np.stack(np.meshgrid(*fine, indexing="ij"), -1)
    density = np.exp(cd.two_moons_log_likelihood(grid, np.array(theta))) * h * h
    mass = density.reshape(bins, per_bin, bins, per_bin).sum(axis=(1, 3))
    keep = mass * n >= 5
    assert mass[keep].sum() > 0.99
    expected = mass[keep] / mass[keep].sum() * counts[keep].sum()
    p_value = stats.chisquare(counts[keep], expected).pvalue
    assert p_value > 1e-3


def test_simulator_shapes_dtypes_and_seeds():
    theta = cd.two_moons_prior(7, seed=1)
    assert theta.shape == (7, 2)
    assert theta.dtype == np.float32
    assert np.all(np.abs(theta) <= 1)
    x = cd.two_moons_simulate(theta, seed=2)
    assert x.shape == (7, 2)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, cd.two_moons_simulate(theta, seed=2))
    assert not np.array_equal(x, cd.two_moons_simulate(theta, seed=3))
    assert np.all(np.isfinite(cd.two_moons_log_likelihood(x, theta)))


def test_likelihood_broadcasts():
    theta = cd.two_moons_prior(3, seed=0)
    x = cd.two_moons_simulate(theta, seed=0)
    full = cd.two_moons_log_likelihood(x[:, None, :], theta[None, :, :])
    assert full.shape == (3, 3)
    np.testing.assert_allclose(np.diag(full), cd.two_moons_log_likelihood(x, theta))


@pytest.fixture(scope="module")
def posterior():
    theta = np.array([[0.3, -0.5]])
    x_o = cd.two_moons_simulate(theta, seed=3)[0]
    return theta[0], cd.grid_posterior(x_o, resolution=1000)


def test_grid_posterior_is_normalised_and_matches_the_exact_evidence(posterior):
    _, grid = posterior
    assert np.exp(grid.log_density).sum() * grid.cell_size**2 == pytest.approx(1.0)
    # The midpoint rule's integral of the likelihood over the box is 4 p(x_o): within 1% of
    # the exact evidence (Monte Carlo over the simulator's noise).
    exact = np.log(4.0) + cd.two_moons_log_evidence(grid.observation[None], num_draws=50_000)[0]
    assert grid.log_normaliser == pytest.approx(exact, abs=0.01)


def test_grid_samples_land_where_the_likelihood_is_high(posterior):
    theta, grid = posterior
    samples = grid.sample(2000, seed=0)
    assert samples.shape == (2000, 2)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, grid.sample(2000, seed=0))
    log_likelihood = cd.two_moons_log_likelihood(grid.observation, samples)
    peak = cd.two_moons_log_likelihood(grid.observation, theta[None]).max()
    # Within 5 radial standard deviations of the crescent's ridge (12.5 nats), all of them.
    assert np.all(log_likelihood > log_likelihood.max() - 12.5 - 1.0)
    assert np.median(log_likelihood) > peak - 2.0
    # The tabulated density at the samples is the exact posterior density there.
    exact = log_likelihood - grid.log_normaliser
    np.testing.assert_allclose(np.median(grid.log_prob(samples) - exact), 0.0, atol=0.05)
    assert grid.log_prob(np.array([[1.5, 0.0]]))[0] == -np.inf


def test_grid_samples_match_a_uniform_prior_rejection_sampler(posterior):
    """Posterior means: the grid's against importance weights of prior draws (exact)."""
    _, grid = posterior
    prior = cd.two_moons_prior(400_000, seed=5).astype(np.float64)
    weights = np.exp(cd.two_moons_log_likelihood(grid.observation, prior))
    reference = (weights[:, None] * prior).sum(0) / weights.sum()
    np.testing.assert_allclose(grid.sample(20_000, seed=1).mean(0), reference, atol=0.02)


@pytest.mark.parametrize("name", cd.EXACT_TOY_SETS)
def test_rotated_toys_have_the_toy_density(name):
    x, c = cd.rotated_toy_samples(name, 20_000, seed=0)
    assert x.shape == c.shape == (20_000, 2)
    assert x.dtype == c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)
    log_p = cd.rotated_toy_log_prob(name, x, c)
    assert np.all(np.isfinite(log_p))  # every point inside the rotated support
    # The held-out NLL estimates the toy's entropy; checkerboard's is log 32 exactly.
    if name == "checkerboard":
        np.testing.assert_allclose(log_p, -np.log(32.0))
    # A wrong context (another angle) gives the points a much lower density.
    wrong = cd.rotated_toy_log_prob(name, x, c[::-1])
    assert np.mean(np.isfinite(wrong) & (wrong > log_p - 1.0)) < 0.6
    np.testing.assert_array_equal(x, cd.rotated_toy_samples(name, 20_000, seed=0)[0])


@pytest.mark.parametrize("name", cd.EXACT_TOY_SETS)
def test_toy_log_prob_integrates_to_one(name):
    h = 0.02
    grid = np.arange(-6, 6, h) + h / 2
    y = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    assert np.exp(cd.toy_log_prob(name, y)).sum() * h * h == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: cd.two_moons_prior(0, seed=0), "num_samples"),
        (lambda: cd.two_moons_simulate(np.zeros(2), seed=0), "theta"),
        (lambda: cd.two_moons_log_likelihood(np.zeros((2, 3)), np.zeros(2)), "x"),
        (lambda: cd.grid_posterior(np.zeros(3)), "observation"),
        (lambda: cd.grid_posterior(np.zeros(2), resolution=5), "resolution"),
        (lambda: cd.grid_posterior(np.array([5.0, 5.0]), resolution=20), "observation"),
        (lambda: cd.two_moons_log_evidence(np.zeros((1, 2)), num_draws=0), "num_draws"),
        (lambda: cd.rotated_toy_samples("nope", 3, seed=0), "name"),
        (lambda: cd.rotated_toy_samples("moons", -1, seed=0), "num_samples"),
        (lambda: cd.toy_log_prob("moons", np.zeros((1, 2))), "name"),
        (lambda: cd.rotated_toy_log_prob("8gaussians", np.zeros((1, 2)), [2.0, 0.0]), "context"),
    ],
)
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()
