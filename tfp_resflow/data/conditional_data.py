"""Conditional data with exact densities: rotated toy densities and the two-moons simulator.

Rotated toys (`rotated_toy_samples`, `rotated_toy_log_prob`): a 2-D toy point y (from
`toy_data.toy_samples`) is rotated by an angle a ~ U[0, 2 pi) drawn per example, and the context
is the angle as a unit vector:

    x = R(a) y,   c = (cos a, sin a),   R(a) = [[cos a, -sin a], [sin a, cos a]]
    p(x | c) = p_toy(R(a)^T x)                         (a rotation has |det| = 1)

so the conditional entropy H(x | c) equals the toy density's entropy, and for the toys with a
closed-form density (`EXACT_TOY_SETS`) the true held-out conditional NLL is known: a model's
held-out NLL minus it estimates KL(p(x | c) || q(x | c)) averaged over c.

Two moons (`two_moons_*`), the simulator of the SBI benchmark (Lueckmann et al., 2021, sbibm's
`two_moons`): prior theta ~ U[-1, 1]^2; given theta,

    a ~ U(-pi/2, pi/2),  r ~ N(0.1, 0.01^2),  p = (r cos a + 0.25, r sin a)
    x = p + m(theta),    m(theta) = (-|theta_1 + theta_2| / sqrt 2, (-theta_1 + theta_2) / sqrt 2)

`two_moons_log_likelihood` is the exact density of x (change of variables, see there);
`two_moons_log_evidence` the exact evidence by Monte Carlo over the simulator's noise, so the
exact posterior density is `log p(x | theta) - log p(x) + log p(theta)`; `grid_posterior` a
posterior tabulated on [-1, 1]^2 for one observation, with a sampler (the reference of a
classifier two-sample test).
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tfp_resflow.core import validation
from tfp_resflow.data.toy_data import TOY_DATASETS, toy_samples

__all__ = [
    "EXACT_TOY_SETS",
    "GridPosterior",
    "TWO_MOONS",
    "TwoMoons",
    "grid_posterior",
    "rotated_toy_log_prob",
    "rotated_toy_samples",
    "toy_log_prob",
    "two_moons_log_evidence",
    "two_moons_log_likelihood",
    "two_moons_prior",
    "two_moons_shift",
    "two_moons_simulate",
]

Seed = int | Sequence[int] | None

# The toy densities of `toy_data` with a closed form (`toy_log_prob`).
EXACT_TOY_SETS = ("8gaussians", "checkerboard")
_UNIT_TOLERANCE = 1e-3  # |c| of a rotation context must be 1 within this


# ------------------------------------------------------------------------------------------------
# Rotated toy densities.


def toy_log_prob(name: str, y: np.ndarray) -> np.ndarray:
    """Exact log-density of a toy set of `toy_data` (those in `EXACT_TOY_SETS`), float64 `[N]`.

    - "8gaussians": (1/8) sum_k N(y; mu_k, s^2 I), mu_k = 2 sqrt 2 (cos k pi/4, sin k pi/4),
      s = 0.5 / sqrt 2.
    - "checkerboard": 1/32 on the 8 cells (2 x 2 squares, area 32 in all) of [-4, 4)^2 with
      floor(y_1 / 2) + floor(y_2 / 2) even, 0 (log: -inf) elsewhere.

    Args:
        name: one of `EXACT_TOY_SETS`.
        y: points `[N, 2]`.

    Raises:
        ValueError: for another name, or `y` not of shape `[N, 2]`.
    """
    validation.choice("name", name, EXACT_TOY_SETS)
    y = _points("y", y)
    if name == "8gaussians":
        angle = np.arange(8) * (np.pi / 4)
        centres = 2 * np.sqrt(2) * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
        scale = 0.5 / np.sqrt(2)
        squared = np.sum((y[:, None, :] - centres) ** 2, axis=-1) / scale**2
        log_components = -0.5 * squared - np.log(2 * np.pi * scale**2)
        return _logsumexp(log_components, axis=1) - np.log(8)
    cell = np.floor(y / 2)
    inside = np.all((y >= -4) & (y < 4), axis=1) & (cell.sum(axis=1) % 2 == 0)
    return np.where(inside, -np.log(32.0), -np.inf)


def rotated_toy_samples(
    name: str, num_samples: int, *, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """Points of a toy density rotated by a random angle each, and the angles as contexts.

        a ~ U[0, 2 pi),  y ~ p_toy,  x = R(a) y,  c = (cos a, sin a)

    Args:
        name: one of `toy_data.TOY_DATASETS`.
        num_samples: N.
        seed: anything `np.random.default_rng` accepts; None for fresh randomness.

    Returns:
        `(x, c)`, float32 arrays `[N, 2]` and `[N, 2]`.

    Raises:
        ValueError: for an unknown name or a non-positive `num_samples`.
    """
    validation.choice("name", name, TOY_DATASETS)
    num_samples = validation.positive_integer("num_samples", num_samples)
    toy_seed, angle_seed = np.random.SeedSequence(_entropy(seed)).spawn(2)
    y = toy_samples(name, num_samples, seed=toy_seed).astype(np.float64)
    angle = np.random.default_rng(angle_seed).uniform(0.0, 2 * np.pi, size=num_samples)
    cos, sin = np.cos(angle), np.sin(angle)
    x = np.stack([cos * y[:, 0] - sin * y[:, 1], sin * y[:, 0] + cos * y[:, 1]], axis=-1)
    context = np.stack([cos, sin], axis=-1)
    return x.astype(np.float32), context.astype(np.float32)


def rotated_toy_log_prob(name: str, x: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Exact `log p(x | c) = log p_toy(R(a)^T x)`, float64 `[N]` (c = (cos a, sin a)).

    Args:
        name: one of `EXACT_TOY_SETS`.
        x: points `[N, 2]`.
        context: unit vectors `[N, 2]` or `[2]`.

    Raises:
        ValueError: for another name, bad shapes, or contexts that are not unit vectors.
    """
    x = _points("x", x)
    context = np.broadcast_to(np.asarray(context, np.float64), x.shape)
    norms = np.linalg.norm(context, axis=-1)
    if not np.all(np.abs(norms - 1) < _UNIT_TOLERANCE):
        validation.fail(
            "context", "unit vectors (cos a, sin a)", f"norms in [{norms.min()}, {norms.max()}]"
        )
    cos, sin = context[:, 0], context[:, 1]
    y = np.stack([cos * x[:, 0] + sin * x[:, 1], -sin * x[:, 0] + cos * x[:, 1]], axis=-1)
    return toy_log_prob(name, y)


# ------------------------------------------------------------------------------------------------
# Two moons.


@dataclasses.dataclass(frozen=True)
class TwoMoons:
    """The two-moons simulator's constants (sbibm's values)."""

    prior_bound: float = 1.0  # theta ~ U[-b, b]^2
    radius_mean: float = 0.1
    radius_std: float = 0.01
    offset: float = 0.25  # the crescent's centre is at (offset, 0) before the shift m(theta)
    angle_low: float = -math.pi / 2
    angle_high: float = math.pi / 2


TWO_MOONS = TwoMoons()


def two_moons_prior(num_samples: int, *, seed: Seed) -> np.ndarray:
    """`num_samples` draws of theta ~ U[-1, 1]^2, float32 `[N, 2]`."""
    num_samples = validation.positive_integer("num_samples", num_samples)
    b = TWO_MOONS.prior_bound
    rng = np.random.default_rng(seed)
    return rng.uniform(-b, b, size=(num_samples, 2)).astype(np.float32)


def two_moons_shift(theta: np.ndarray) -> np.ndarray:
    """`m(theta) = (-|theta_1 + theta_2| / sqrt 2, (-theta_1 + theta_2) / sqrt 2)`, float64.

    A rotation of theta by -pi/4 (`z = R theta`) followed by folding its first coordinate to
    `-|z_1|`: every m with `m_1 < 0` has exactly two preimages, with unit |Jacobian| each.
    """
    theta = _points("theta", theta)
    root2 = np.sqrt(2.0)
    return np.stack(
        [-np.abs(theta[:, 0] + theta[:, 1]) / root2, (theta[:, 1] - theta[:, 0]) / root2], axis=-1
    )


def two_moons_simulate(theta: np.ndarray, *, seed: Seed) -> np.ndarray:
    """One simulation x per parameter: `x = p + m(theta)` (see the module docstring).

    Args:
        theta: parameters `[N, 2]`.
        seed: anything `np.random.default_rng` accepts; None for fresh randomness.

    Returns:
        float32 `[N, 2]`.
    """
    shift = two_moons_shift(theta)
    rng = np.random.default_rng(seed)
    n = len(shift)
    angle = rng.uniform(TWO_MOONS.angle_low, TWO_MOONS.angle_high, size=n)
    radius = rng.normal(TWO_MOONS.radius_mean, TWO_MOONS.radius_std, size=n)
    p = np.stack([radius * np.cos(angle) + TWO_MOONS.offset, radius * np.sin(angle)], axis=-1)
    return (p + shift).astype(np.float32)


def _noise_log_density(p: np.ndarray) -> np.ndarray:
    """Exact log-density of `p = (r cos a + offset, r sin a)`, `[..., 2] -> [...]`, float64.

    With `(u, v) = (p_1 - offset, p_2)`, `rho = |(u, v)|` and `s = sign(u)`, the map
    `(a, r) -> (u, v)` from `(-pi/2, pi/2) x (R minus 0)` is one-to-one onto the plane without the
    line u = 0 (r < 0 lands at u < 0, at radius -r), with inverse `r = s rho`,
    `a = atan(v / u)` and |Jacobian| `|r| = rho`. Hence, exactly (no approximation: the
    r < 0 branch is kept, although its mass is Phi(-10) ~ 1e-23),

        p(u, v) = (1 / pi) N(s rho; 0.1, 0.01^2) / rho.
    """
    u = p[..., 0] - TWO_MOONS.offset
    v = p[..., 1]
    rho = np.hypot(u, v)
    r = np.where(u >= 0, rho, -rho)
    sigma = TWO_MOONS.radius_std
    log_normal = -0.5 * ((r - TWO_MOONS.radius_mean) / sigma) ** 2 - np.log(
        np.sqrt(2 * np.pi) * sigma
    )
    log_angle = -np.log(TWO_MOONS.angle_high - TWO_MOONS.angle_low)  # -log pi
    with np.errstate(divide="ignore"):
        return log_normal + log_angle - np.log(rho)


def two_moons_log_likelihood(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact `log p(x | theta)` of the two-moons simulator, float64 (shapes broadcast).

    `x = p + m(theta)` with m fixed given theta, so `p(x | theta) = p_noise(x - m(theta))`
    (a translation, Jacobian 1), and `p_noise` is the exact density of the crescent: the
    change of variables from (a, r) in `_noise_log_density`, whose Jacobian |r| is the 1/rho.
    (sbibm's `_likelihood` keeps only the radial Gaussian, which is proportional to this only
    up to the factor 1 / (pi rho), about constant on the thin crescent.)

    Args:
        x: observations `[..., 2]`.
        theta: parameters `[..., 2]`, broadcasting against `x`.

    Returns:
        `[...]`, the broadcast batch shape.
    """
    x = np.asarray(x, np.float64)
    theta = np.asarray(theta, np.float64)
    for name, value in (("x", x), ("theta", theta)):
        if value.ndim == 0 or value.shape[-1] != 2:
            validation.fail(name, "an array of shape [..., 2]", value.shape)
    x, theta = np.broadcast_arrays(x, theta)
    shape = x.shape[:-1]
    shift = two_moons_shift(theta.reshape(-1, 2))
    return _noise_log_density(x.reshape(-1, 2) - shift).reshape(shape)


def _preimages_in_prior(m: np.ndarray) -> np.ndarray:
    """How many theta in the prior's box have `m(theta) = m`: 0, 1 or 2, `[N, 2] -> [N]`.

    For `m_1 <= 0`: z = (+-|m_1|, m_2) and theta = R^T z, i.e.
    theta = ((z_1 - z_2) / sqrt 2, (z_1 + z_2) / sqrt 2).
    """
    root2, b = np.sqrt(2.0), TWO_MOONS.prior_bound
    count = np.zeros(len(m))
    for sign in (1.0, -1.0):
        z1 = sign * np.abs(m[:, 0])
        theta = np.stack([(z1 - m[:, 1]) / root2, (z1 + m[:, 1]) / root2], axis=-1)
        count += np.all(np.abs(theta) <= b, axis=-1) & (m[:, 0] <= 0)
    return count


def two_moons_log_evidence(x: np.ndarray, *, num_draws: int = 4096, seed: Seed = 0) -> np.ndarray:
    """`log p(x)` under the uniform prior, by Monte Carlo over the simulator's noise, `[N]`.

    With p ~ p_noise, theta -> m(theta) two-to-one with unit Jacobian onto `m_1 <= 0`:

        p(x) = (1/4) int_box p_noise(x - m(theta)) d theta = (1/4) E_p[ N_box(x - p) ]

    where `N_box(m)` counts the preimages of m in the prior box (0, 1 or 2). So the posterior
    density is exactly `p(theta | x) = p(x | theta) / E_p[N_box(x - p)]` on the box; only the
    expectation is estimated (the same `num_draws` noise draws for every x).

    Args:
        x: observations `[N, 2]`.
        num_draws: noise draws.
        seed: seeds the draws.
    """
    x = _points("x", x)
    num_draws = validation.positive_integer("num_draws", num_draws)
    noise = two_moons_simulate(np.zeros((num_draws, 2)), seed=seed).astype(np.float64)
    counts = np.stack([_preimages_in_prior(xi - noise).mean() for xi in x])
    with np.errstate(divide="ignore"):
        return np.log(counts / 4.0)


@dataclasses.dataclass(frozen=True)
class GridPosterior:
    """A posterior tabulated at the midpoints of an n x n grid of cells on [-b, b]^2.

    Attributes:
        observation: x_o, `[2]`.
        centres: the cells' midpoints along each axis, `[n]`.
        log_density: normalised log p(theta | x_o) at the midpoints, `[n, n]` (axis 0 is
            theta_1, axis 1 theta_2), so that `sum(exp(log_density)) * cell_size**2 = 1`.
        cell_size: h = 2 b / n.
        log_normaliser: log of `sum_cells p(x_o | theta) h^2`, the midpoint rule's value of
            the integral of the likelihood over the box (= 4 p(x_o)).
    """

    observation: np.ndarray
    centres: np.ndarray
    log_density: np.ndarray
    cell_size: float
    log_normaliser: float

    def sample(self, num_samples: int, *, seed: Seed) -> np.ndarray:
        """Draws from the piecewise-constant density: a cell by its mass, then uniform in it.

        Returns:
            float32 `[num_samples, 2]`.
        """
        num_samples = validation.positive_integer("num_samples", num_samples)
        rng = np.random.default_rng(seed)
        mass = np.exp(self.log_density).ravel()
        cells = rng.choice(mass.size, size=num_samples, p=mass / mass.sum())
        i, j = np.unravel_index(cells, self.log_density.shape)
        jitter = rng.uniform(-0.5, 0.5, size=(num_samples, 2)) * self.cell_size
        theta = np.stack([self.centres[i], self.centres[j]], axis=-1) + jitter
        return theta.astype(np.float32)

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        """The tabulated log-density at the cells containing `theta` `[N, 2]` (-inf outside)."""
        theta = _points("theta", theta)
        b = TWO_MOONS.prior_bound
        index = np.floor((theta + b) / self.cell_size).astype(int)
        n = len(self.centres)
        inside = np.all((index >= 0) & (index < n), axis=-1)
        index = np.clip(index, 0, n - 1)
        values = self.log_density[index[:, 0], index[:, 1]]
        return np.where(inside, values, -np.inf)


def grid_posterior(observation: np.ndarray, *, resolution: int = 1000) -> GridPosterior:
    """The two-moons posterior p(theta | x_o) on a `resolution`^2 grid over the prior's box.

    The posterior is `p(x_o | theta) / Z` on [-1, 1]^2 (a uniform prior), evaluated exactly at
    the cell midpoints (`two_moons_log_likelihood`) and normalised by the midpoint rule.

    Resolution: the posterior is the crescent folded into theta-space by an isometry (m is a
    rotation and a reflection), so its cross-section is the radial Gaussian of std
    sigma = 0.01 and its arc has radius 0.1. The default n = 1000 gives h = 0.002 = sigma / 5,
    five cells per standard deviation across the crescent: the midpoint rule's error on the
    Gaussian profile is about (h / sigma)^2 / 24 = 0.2%, but the crescent's ends are cut
    (a = +-pi/2, where the density jumps to 0), which makes the error first order in h:
    measured against the exact Monte Carlo evidence (`two_moons_log_evidence`) the normaliser
    is 0.45% low at n = 1000 (0.9% at 500, 0.22% at 2000), a shift of 0.005 nats in the log
    density. The sampler's uniform jitter inside a cell adds variance h^2 / 12, 0.3% of
    sigma^2.

    Args:
        observation: x_o, shape `[2]` (or `[1, 2]`).
        resolution: cells per axis, at least 10.

    Raises:
        ValueError: for a bad shape or resolution, or an observation of zero evidence (no
            theta in the box can produce it).
    """
    observation = np.asarray(observation, np.float64).reshape(-1)
    if observation.shape != (2,):
        validation.fail("observation", "x_o of shape [2]", observation.shape)
    resolution = validation.integer("resolution", resolution, minimum=10)
    b = TWO_MOONS.prior_bound
    h = 2 * b / resolution
    centres = -b + h * (np.arange(resolution) + 0.5)
    theta = np.stack(np.meshgrid(centres, centres, indexing="ij"), axis=-1)
    log_likelihood = two_moons_log_likelihood(observation, theta)
    peak = log_likelihood.max()
    if not np.isfinite(peak) or peak < -1e3:
        validation.fail(
            "observation",
            "an x_o that some theta in the prior's box can produce",
            observation.tolist(),
        )
    log_normaliser = peak + np.log(np.sum(np.exp(log_likelihood - peak)) * h * h)
    return GridPosterior(
        observation=observation,
        centres=centres,
        log_density=log_likelihood - log_normaliser,
        cell_size=h,
        log_normaliser=float(log_normaliser),
    )


# ------------------------------------------------------------------------------------------------
# Helpers.


def _points(name: str, value: np.ndarray) -> np.ndarray:
    """`value` as float64 `[N, 2]`."""
    array = np.asarray(value, np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        validation.fail(name, "an array of shape [N, 2]", array.shape)
    return array


def _entropy(seed: Seed) -> int | Sequence[int] | None:
    """A `SeedSequence` entropy from a seed (None: fresh)."""
    if seed is None or isinstance(seed, int | np.integer):
        return None if seed is None else int(seed)
    return [int(s) for s in seed]


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(peak, axis) + np.log(np.sum(np.exp(a - peak), axis=axis))
