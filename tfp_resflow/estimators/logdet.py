"""Estimators of `log|det(I + J_g(x))|` for a residual map `x -> x + g(x)` with `Lip(g) < 1`.

Every estimator has one signature, so a bijector can take any of them:

    estimator(residual_fn, x, *, seed=None, parameters=(), **options) -> (g(x), log_det)

where `x` is a float tensor of shape `[batch, *event_shape]` (vectors `[B, D]`, images
`[B, H, W, C]`), `residual_fn` maps it to a tensor of the same shape, and `log_det` has shape
`[batch]`. The first axis is always the batch; every other axis is the event. `g(x)` is the
value of the residual branch (a residual block's output is `x + g(x)`, so it needs no second
evaluation of `g`), and `parameters` lists tensors that `g` reads by closure and that need
gradients (the variables it reads are found automatically).

The stochastic estimators (truncated and roulette) sum the Hutchinson power series of the
log-det: n terms cost n vector-Jacobian products and no Jacobian. With `neumann_gradient=True`
their gradient is the memory-flat Neumann estimate (Chen et al., 2019, eq. 8). The series, its
weights and its gradient, with their math, are in `tfp_resflow.estimators.series`.

References:
    Chen, Behrmann, Duvenaud, Jacobsen (2019). Residual Flows for Invertible Generative
    Modeling. NeurIPS. https://arxiv.org/abs/1906.02735
    Behrmann et al. (2019). Invertible Residual Networks. ICML. https://arxiv.org/abs/1811.00995
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tfp_resflow.core import stateless_random, validation
from tfp_resflow.core.stateless_random import SeedLike
from tfp_resflow.estimators.roulette import russian_roulette_log_det
from tfp_resflow.estimators.series import (
    DISTRIBUTIONS,
    PROBES,
    STREAM_PROBE,
    ResidualFn,
    check_series_options,
    series_log_det,
)

__all__ = [
    "DISTRIBUTIONS",  # the values of the estimators' options, with the registry below
    "PROBES",
    "EVAL_EXACT_MAX_EVENT_SIZE",
    "EVAL_NUM_EXACT_TERMS",
    "LOG_DET_NAMES",
    "LogDetFn",
    "ResidualFn",
    "ESTIMATORS",
    "EVAL_LOG_DET_NAMES",
    "Estimator",
    "eval_log_det_name",
    "exact_log_det",
    "make_log_det_fn",
    "power_series_log_det",
    "russian_roulette_log_det",
]

LogDetFn = Callable[..., tuple[tf.Tensor, tf.Tensor]]
"""`(residual_fn, x, *, seed=None) -> (g(x), log_det)`; bind options with functools.partial."""

# Evaluation: the exact log-det costs one VJP per event dimension, the authors' evaluation series
# about 20 + 2 VJPs, so exact is both cheaper and better up to about 20 dimensions.
EVAL_EXACT_MAX_EVENT_SIZE = 20
EVAL_NUM_EXACT_TERMS = 20


# ------------------------------------------------------------------------------------------------
# Exact log-det (small events).


def _event_size(x: tf.Tensor) -> tf.Tensor | int:
    static = x.shape[1:].num_elements()
    return static if static is not None else tf.reduce_prod(tf.shape(x)[1:])


def _log_abs_det(matrix: tf.Tensor) -> tf.Tensor:
    """`log|det(A)|` of a batch of square matrices, `[..., D, D] -> [...]`.

    Computed as `sum(log|diag(R)|)` for `A = QR` because `tf.linalg.slogdet` has no XLA kernel
    on CPU, while QR has one and a gradient for square inputs.
    """
    r = tf.linalg.qr(matrix, full_matrices=False).r
    return tf.reduce_sum(tf.math.log(tf.abs(tf.linalg.diag_part(r))), axis=-1)


def exact_log_det(
    residual_fn: ResidualFn,
    x: tf.Tensor,
    *,
    seed: SeedLike = None,
    parameters: Sequence[tf.Tensor] = (),
) -> tuple[tf.Tensor, tf.Tensor]:
    """Exact `log|det(I + J_g(x))|` from the full Jacobian of `g`.

    Costs `D = prod(event_shape)` backward passes and a `D x D` factorisation per example, so it
    is meant for small events: 2-D toys, tests and evaluation of small models. Differentiable
    with respect to `x` and the variables of `g` by ordinary autodiff.

    Args:
        residual_fn: `g`, maps `[batch, *event_shape]` to the same shape.
        x: float tensor of shape `[batch, *event_shape]`.
        seed: unused; accepted so that all estimators share one signature.
        parameters: unused (autodiff sees every tensor `g` reads); accepted for the signature.

    Returns:
        `(g(x), log_det)` with `log_det` of shape `[batch]`.
    """
    del seed, parameters  # Deterministic; differentiated by autodiff.
    x = validation.batch_of_events("x", x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        gx = residual_fn(x)
    jacobian = tape.batch_jacobian(gx, x)  # [B, *event, *event]
    size = _event_size(x)
    jacobian = tf.reshape(jacobian, tf.stack([tf.shape(x)[0], size, size]))
    log_det = _log_abs_det(tf.eye(size, dtype=x.dtype) + jacobian)
    return gx, log_det


# ------------------------------------------------------------------------------------------------
# Series estimators.


def power_series_log_det(
    residual_fn: ResidualFn,
    x: tf.Tensor,
    *,
    seed: SeedLike = None,
    parameters: Sequence[tf.Tensor] = (),
    num_terms: int = 10,
    probe: str = "rademacher",
    num_probes: int = 1,
    neumann_gradient: bool = False,
    backward_slice_size: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Truncated power series (biased; the i-ResNet estimator), kept for ablations.

        log_det ~= sum{ (-1)**(k+1) / k * v^T J**k v : k = 1..num_terms }

    Its mean is the truncated series, not the log-det: the bias is
    `sum{ (-1)**(k+1) / k * tr(J**k) : k > num_terms }`.

    Args:
        residual_fn: `g`, maps `[batch, *event_shape]` to the same shape.
        x: float tensor of shape `[batch, *event_shape]`.
        seed: `None` (fresh randomness on every call), an int, or a pair of ints.
        parameters: tensors that `residual_fn` reads by closure and that need gradients, e.g.
            the weight values of a Keras layer's `stateless_call` (the Neumann gradient is a
            custom gradient, which sees only its arguments and the variables `g` reads).
        num_terms: number of series terms, >= 1.
        probe: Hutchinson probe distribution, "rademacher" (lower variance) or "gaussian".
        num_probes: independent probes per example, averaged.
        neumann_gradient: if True, the gradient is the Neumann series truncated to match
            (`w = sum{ (-1)**k v^T J**k : k < num_terms }`), an unbiased estimate of the exact
            gradient of the truncated series with memory flat in `num_terms`; if False (the
            default, as in i-ResNet), autodiff through the series.
        backward_slice_size: with the Neumann gradient, the backward pass recomputes `g` and
            differentiates it in equal slices of at most this many rows (examples times
            probes), one after another: the same gradients, with the activations of one slice
            alive instead of the whole batch's (for large images; `g` must treat examples
            independently, as every `g` here does). None: the whole batch at once.

    Returns:
        `(g(x), log_det)` with `log_det` of shape `[batch]`.

    Raises:
        ValueError: for a bad `num_terms`, `probe`, `num_probes` or `backward_slice_size`.
    """
    validation.integer("num_terms", num_terms, 1)
    check_series_options(probe, num_probes, backward_slice_size)
    x = validation.batch_of_events("x", x)
    seed = stateless_random.sanitize_seed(seed)

    def neumann_weight(k: tf.Tensor) -> tf.Tensor:
        # u_k for k < num_terms: d/dtheta tr(J**k) / k = tr(J**(k-1) dJ/dtheta).
        return tf.where(k < num_terms, tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64))

    return series_log_det(
        residual_fn,
        x,
        parameters=tuple(parameters),
        probe_seed=stateless_random.fold_in(seed, STREAM_PROBE),
        num_terms=tf.constant(num_terms),
        term_weight=lambda k: tf.constant(1.0, tf.float64),
        neumann_weight=neumann_weight,
        probe=probe,
        num_probes=num_probes,
        neumann_gradient=neumann_gradient,
        backward_slice_size=backward_slice_size,
        maximum_iterations=num_terms,
    )


# ------------------------------------------------------------------------------------------------
# The registry: every module and the command line read estimator names and options from here.


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function and the names of the options it takes."""

    function: LogDetFn
    options: tuple[str, ...]


_SERIES_OPTIONS = ("probe", "num_probes", "neumann_gradient", "backward_slice_size")
ESTIMATORS: dict[str, Estimator] = {
    "unbiased": Estimator(
        russian_roulette_log_det,
        ("num_exact_terms", "term_distribution", "geometric_p", "poisson_rate", *_SERIES_OPTIONS),
    ),
    "exact": Estimator(exact_log_det, ()),
    "truncated": Estimator(power_series_log_det, ("num_terms", *_SERIES_OPTIONS)),
}
LOG_DET_NAMES = tuple(ESTIMATORS)
# Evaluation: "auto", or any registered name.
EVAL_LOG_DET_NAMES = ("auto", *LOG_DET_NAMES)


def make_log_det_fn(log_det: str | LogDetFn, options: Mapping[str, Any] | None = None) -> LogDetFn:
    """Resolves a log-det name and its options to an estimator with the common signature.

    Args:
        log_det: a name of `ESTIMATORS` ("unbiased": `russian_roulette_log_det`, "exact":
            `exact_log_det`, "truncated": `power_series_log_det`) or a callable with the
            `logdet` signature.
        options: keyword options bound to the estimator (for example
            `{"term_distribution": "poisson", "num_exact_terms": 2}`).

    Returns:
        `(residual_fn, x, *, seed=None) -> (g(x), log_det)`.

    Raises:
        ValueError: for an unknown name, or an option the estimator does not take.
    """
    options = dict(options or {})
    if callable(log_det):
        return functools.partial(log_det, **options) if options else log_det
    validation.choice("log_det", log_det, LOG_DET_NAMES, extra="a callable")
    estimator = ESTIMATORS[log_det]
    unknown = sorted(set(options) - set(estimator.options))
    if unknown:
        takes = f"takes {list(estimator.options)}" if estimator.options else "takes no options"
        raise ValueError(f"log_det={log_det!r} {takes}; got {unknown}.")
    return functools.partial(estimator.function, **options)


def eval_log_det_name(eval_log_det: str, event_size: int) -> str:
    """The estimator evaluation uses for events of `event_size` dimensions.

    "auto" picks the exact log-det up to `EVAL_EXACT_MAX_EVENT_SIZE` dimensions (one VJP per
    dimension, cheaper than the series there) and the authors' evaluation estimator above: the
    roulette, with `EVAL_NUM_EXACT_TERMS` exact terms (see `config.BlockConfig`), whatever the
    training estimator, so that evaluation log-likelihoods are comparable across ablations.
    """
    validation.choice("eval_log_det", eval_log_det, EVAL_LOG_DET_NAMES)
    if eval_log_det != "auto":
        return eval_log_det
    return "exact" if event_size <= EVAL_EXACT_MAX_EVENT_SIZE else "unbiased"
