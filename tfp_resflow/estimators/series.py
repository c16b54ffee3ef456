"""The Hutchinson power series behind the stochastic log-det estimators, and its Neumann gradient.

For a residual map `x -> x + g(x)` whose Jacobian `J = J_g(x)` has spectral radius below 1:

    log|det(I + J)| = sum{ (-1)**(k+1) / k * tr(J**k) : k >= 1 }
    tr(J**k) = E_v[ v^T J**k v ]      (Hutchinson; E[v v^T] = I)

`v^T J**k` is k vector-Jacobian products (VJPs) of `g`, so an estimate with n terms costs
n VJPs and no Jacobian. With term weights `c_k` (1 for the truncated series, inverse
probabilities for the Russian roulette) `series_log_det` computes, per example,

    log_det = mean_probes sum{ (-1)**(k+1) / k * c_k * <u_k, v> : k = 1..n }
    u_0 = v,  u_k = u_{k-1}^T J  (one VJP each)

The gradient of the log-det has its own series (Neumann series of the inverse; Chen et al.,
2019, eq. 8):

    d/dtheta log|det(I + J)| = tr((I + J)^-1 dJ/dtheta)
                             = sum{ (-1)**k tr(J**k dJ/dtheta) : k >= 0 }

With `neumann_gradient=True` the value is the series estimate above, while the gradient (with
respect to `x` and every variable `g` reads) is the Neumann estimate `d/dtheta <w^T J, v>` with
the constant vector

    w = sum{ (-1)**k * d_k * u_k : k = 0..n }      (d_k: the Neumann weights)

Only `x`, `v` and `w` are kept for the backward pass, so memory does not grow with the number of
terms. The roulette (`tfp_resflow.estimators.roulette`) draws the number of terms beyond the exact
ones and weighs them by the inverse probability that they are computed.

References:
    Chen, Behrmann, Duvenaud, Jacobsen (2019). Residual Flows for Invertible Generative
    Modeling. NeurIPS. https://arxiv.org/abs/1906.02735
    Behrmann et al. (2019). Invertible Residual Networks. ICML. https://arxiv.org/abs/1811.00995
"""

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from tfp_resflow.core import stateless_random, validation

__all__ = [
    "DISTRIBUTIONS",
    "PROBES",
    "STREAM_NUM_TERMS",
    "STREAM_PROBE",
    "check_series_options",
    "series_log_det",
]

PROBES = ("gaussian", "rademacher")
DISTRIBUTIONS = ("geometric", "poisson")
# Seed sub-streams: the number of terms and the probes must be independent draws.
STREAM_NUM_TERMS, STREAM_PROBE = 0, 1

ResidualFn = Callable[[tf.Tensor], tf.Tensor]
Weight = Callable[[tf.Tensor], tf.Tensor]


def check_series_options(probe: str, num_probes: int, backward_slice_size: int | None) -> None:
    """The options every series estimator takes: its probes and the backward's slices."""
    validation.choice("probe", probe, PROBES)
    validation.integer("num_probes", num_probes, 1)
    validation.optional(validation.integer, "backward_slice_size", backward_slice_size, 1)


def _event_dot(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per-example inner product over all event axes, `[B, *event] x 2 -> [B]`."""
    return tf.reduce_sum(tf.reshape(a * b, tf.stack([tf.shape(a)[0], -1])), axis=-1)


def _draw_probe(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType, probe: str) -> tf.Tensor:
    if probe == "gaussian":
        return stateless_random.normal(shape, seed, dtype)
    return stateless_random.rademacher(shape, seed, dtype)


def _tile(t: tf.Tensor, num_probes: int) -> tf.Tensor:
    # Several probes per example: tile the batch so that each VJP serves all probes at once.
    return tf.concat([t] * num_probes, axis=0) if num_probes > 1 else t


def _sign(k: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """`(-1)**(k+1)`."""
    return tf.where(k % 2 == 1, tf.constant(1.0, dtype), tf.constant(-1.0, dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class _Series:
    """One estimate's probes `v` (tiled over the batch), weights and number of terms."""

    residual_fn: ResidualFn
    v: tf.Tensor
    batch: tf.Tensor
    num_probes: int
    num_terms: tf.Tensor
    term_weight: Weight
    neumann_weight: Weight
    maximum_iterations: int | None
    backward_slice_size: int | None = None

    def tile(self, t: tf.Tensor) -> tf.Tensor:
        return _tile(t, self.num_probes)

    def first_tile(self, t: tf.Tensor) -> tf.Tensor:
        return t[: self.batch] if self.num_probes > 1 else t

    def mean_over_probes(self, per_row: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.reshape(per_row, tf.stack([self.num_probes, self.batch])), axis=0)

    def sum_over_probes(self, t: tf.Tensor) -> tf.Tensor:
        return tf.add_n(tf.split(t, self.num_probes, axis=0)) if self.num_probes > 1 else t

    def run(
        self, x_tiled: tf.Tensor, *, with_neumann_vector: bool
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(g(x), log_det, w)`: the terms in a `tf.while_loop`, one VJP each."""
        dtype, v = x_tiled.dtype, self.v
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x_tiled)
            gx_tiled = self.residual_fn(x_tiled)

        def body(
            k: tf.Tensor, u: tf.Tensor, log_det: tf.Tensor, w: tf.Tensor
        ) -> tuple[tf.Tensor, ...]:
            u = tape.gradient(gx_tiled, x_tiled, output_gradients=u)  # u_k = u_{k-1}^T J
            kf = tf.cast(k, dtype)
            weight = tf.cast(self.term_weight(k), dtype)
            log_det += _sign(k, dtype) * weight / kf * _event_dot(u, v)
            if with_neumann_vector:
                w += -_sign(k, dtype) * tf.cast(self.neumann_weight(k), dtype) * u
            return k + 1, u, log_det, w

        w0 = tf.cast(self.neumann_weight(tf.constant(0)), dtype) * v if with_neumann_vector else v
        _, _, log_det, w = tf.while_loop(
            lambda k, *_: k <= self.num_terms,
            body,
            (tf.constant(1), v, tf.zeros([tf.shape(x_tiled)[0]], dtype), w0),
            maximum_iterations=self.maximum_iterations,
        )
        return self.first_tile(gx_tiled), self.mean_over_probes(log_det), w


def series_log_det(
    residual_fn: ResidualFn,
    x: tf.Tensor,
    *,
    parameters: Sequence[tf.Tensor],
    probe_seed: tf.Tensor,
    num_terms: tf.Tensor,
    term_weight: Weight,
    neumann_weight: Weight,
    probe: str,
    num_probes: int,
    neumann_gradient: bool,
    maximum_iterations: int | None,
    backward_slice_size: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The weighted Hutchinson power series shared by the truncated and roulette estimators.

        log_det = mean_probes sum{ (-1)**(k+1) / k * term_weight(k) * <u_k, v> : k = 1..n }
        u_0 = v,  u_k = u_{k-1}^T J  (one VJP each)
        w = sum{ (-1)**k * neumann_weight(k) * u_k : k = 0..n }   (Neumann vector)

    Args:
        residual_fn: `g`.
        x: `[B, *event]`.
        parameters: tensors `g` reads by closure that need gradients (the Neumann gradient's
            custom gradient sees only its arguments and the variables `g` reads).
        probe_seed: sanitised seed for the probes.
        num_terms: int32 scalar `n`, may be random.
        term_weight: `k -> weight` (float64 scalar) of series term k >= 1.
        neumann_weight: `k -> weight` of `u_k` in the Neumann vector, k >= 0.
        probe: "gaussian" or "rademacher".
        num_probes: probes per example; the batch is tiled that many times.
        neumann_gradient: whether the gradient is the Neumann estimate (memory-flat).
        maximum_iterations: static bound on `n`, or None (then the plain estimator cannot be
            differentiated under XLA, which needs static loop bounds for backprop).
        backward_slice_size: at most this many rows at once in the Neumann backward pass, which
            recomputes and differentiates `g` slice by slice (`_neumann_backward`); None: all.

    Returns:
        `(g(x), log_det)`.
    """
    v = _draw_probe(tf.shape(_tile(x, num_probes)), probe_seed, x.dtype, probe)
    series = _Series(
        residual_fn,
        v,
        tf.shape(x)[0],
        num_probes,
        num_terms,
        term_weight,
        neumann_weight,
        maximum_iterations,
        backward_slice_size,
    )
    if not neumann_gradient:
        # Plain estimator: autodiff through the series; memory grows with the number of terms.
        gx, log_det, _ = series.run(series.tile(x), with_neumann_vector=False)
        return gx, log_det
    return _with_neumann_gradient(series, x, tuple(parameters))


def _with_neumann_gradient(
    series: _Series, x: tf.Tensor, parameters: tuple[tf.Tensor, ...]
) -> tuple[tf.Tensor, tf.Tensor]:
    """`series.run` with the Neumann estimate as its (custom) gradient."""

    @tf.custom_gradient
    def series_with_neumann_gradient(
        x_in: tf.Tensor, *parameters_in: tf.Tensor
    ) -> tuple[tuple[tf.Tensor, tf.Tensor], Callable[..., object]]:
        del parameters_in  # The same tensors that `residual_fn` reads.
        x_tiled = series.tile(x_in)
        gx, log_det, w = series.run(x_tiled, with_neumann_vector=True)

        def grad_fn(
            d_gx: tf.Tensor | None, d_log_det: tf.Tensor | None, variables: list | None = None
        ) -> object:
            upstream = (d_gx, d_log_det)
            return _neumann_backward(series, x_tiled, w, upstream, parameters, variables)

        return (gx, log_det), grad_fn

    return series_with_neumann_gradient(x, *parameters)


def _neumann_backward(
    series: _Series,
    x_tiled: tf.Tensor,
    w: tf.Tensor,
    upstream: tuple[tf.Tensor | None, tf.Tensor | None],
    parameters: tuple[tf.Tensor, ...],
    variables: list | None,
) -> object:
    """Gradients for `x`, `parameters` (and `variables`) from one recomputation of `g`.

    The inner tape gives `w^T J`, the outer one differentiates the surrogate

        sum_rows r[row] * <w_row^T J_row, v_row> + sum_rows <g(x)_row, c_row>

    with `w` and `v` held constant (`r`: each row's upstream log-det weight, `c`: its upstream
    value gradient, zero on the probe copies): the value path and the Neumann estimate in one
    recomputation. Each example keeps its own upstream weight (the authors' memory-efficient
    backward uses the first example's weight for all). The surrogate is a sum over rows, so
    with `series.backward_slice_size` set the rows are taken in equal slices of at most that
    many, one after another (`_sum_over_slices`): the same gradients, with the activations of
    one slice of the batch alive instead of the whole batch's.
    """
    d_gx, d_log_det = upstream
    # Recompute g once the upstream gradients exist: without this ordering the runtime may run
    # every block's recomputation early and hold all of their activations.
    with tf.control_dependencies([t for t in upstream if t is not None]):
        x_again = tf.identity(x_tiled)
    row_weight = None if d_log_det is None else series.tile(d_log_det / series.num_probes)
    row_value = None
    if d_gx is not None:  # the value path reads the first tile only
        row_value = tf.concat([d_gx] + [tf.zeros_like(d_gx)] * (series.num_probes - 1), axis=0)
    watched_rest = [*parameters, *(variables or [])]

    def row_gradients(
        x_rows: tf.Tensor,
        w_rows: tf.Tensor,
        v_rows: tf.Tensor,
        weight_rows: tf.Tensor | None,
        value_rows: tf.Tensor | None,
    ) -> list[tf.Tensor]:
        """`[d x_rows, *d parameters, *d variables]` of the surrogate's terms of some rows."""
        with tf.GradientTape() as outer:
            outer.watch([x_rows, *watched_rest])
            with tf.GradientTape() as inner:
                inner.watch(x_rows)
                gx_rows = series.residual_fn(x_rows)
            w_jacobian = inner.gradient(gx_rows, x_rows, output_gradients=w_rows)
            surrogate = tf.zeros([], x_tiled.dtype)
            if weight_rows is not None:
                surrogate += tf.reduce_sum(weight_rows * _event_dot(w_jacobian, v_rows))
            if value_rows is not None:
                surrogate += tf.reduce_sum(gx_rows * value_rows)
        return outer.gradient(
            surrogate, [x_rows, *watched_rest], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    per_row = [x_again, w, series.v, row_weight, row_value]
    slice_size = series.backward_slice_size
    rows = x_again.shape[0]
    if slice_size is None or (rows is not None and rows <= slice_size):
        grads = row_gradients(*per_row)
    else:
        grads = _sum_over_slices(row_gradients, per_row, slice_size, watched_rest)
    num_parameters = len(parameters)
    input_grads = [series.sum_over_probes(grads[0]), *grads[1 : 1 + num_parameters]]
    if variables is None:
        return input_grads
    return input_grads, grads[1 + num_parameters :]


def _sum_over_slices(
    row_gradients: Callable[..., list[tf.Tensor]],
    per_row: list[tf.Tensor | None],
    slice_size: int,
    shared: Sequence[tf.Tensor],
) -> list[tf.Tensor]:
    """`row_gradients` over equal slices of at most `slice_size` rows, one slice at a time.

    `n` rows make `k = ceil(n / slice_size)` slices of `ceil(n / k)` rows, the last padded with
    zero rows (zero weights: they add nothing to the surrogate), so that every slice has one
    shape, as XLA needs. The first result (the gradient of the rows of `per_row[0]`) is stacked
    over the slices, the others (the gradients of the `shared` tensors and variables, in order)
    summed. `parallel_iterations=1`: a slice starts once the previous one is done, so the
    runtime cannot hold two slices' activations at once.
    """
    # Python ints when the batch size is static (so the slices' shape is), tensors otherwise.
    num_rows = per_row[0].shape[0]
    if num_rows is None:
        num_rows = tf.shape(per_row[0])[0]
        chunks = tf.maximum((num_rows + slice_size - 1) // slice_size, 1)  # 1 for an empty batch
    else:
        chunks = max((num_rows + slice_size - 1) // slice_size, 1)
    size = (num_rows + chunks - 1) // chunks
    static_size = size if isinstance(size, int) else None

    def split(t: tf.Tensor | None) -> tf.Tensor | None:
        """`[rows, *rest] -> [chunks, size, *rest]`, zero-padded."""
        if t is None:
            return None
        padding = [[0, size * chunks - num_rows]] + [[0, 0]] * (t.shape.rank - 1)
        t = tf.pad(t, padding)
        split_t = tf.reshape(t, tf.concat([[chunks, size], tf.shape(t)[1:]], axis=0))
        return tf.ensure_shape(split_t, [None, static_size, *t.shape[1:]])

    slices = [split(t) for t in per_row]

    def body(i: tf.Tensor, rows: tf.TensorArray, *sums: tf.Tensor) -> tuple:
        grads = row_gradients(*(None if t is None else t[i] for t in slices))
        sums = [s + tf.convert_to_tensor(g) for s, g in zip(sums, grads[1:], strict=True)]
        return (i + 1, rows.write(i, grads[0]), *sums)

    rows = tf.TensorArray(per_row[0].dtype, size=chunks)
    zeros = [tf.zeros_like(t) for t in shared]
    _, rows, *sums = tf.while_loop(
        lambda i, *_: i < chunks, body, (tf.constant(0), rows, *zeros), parallel_iterations=1
    )
    row_grads = rows.stack()  # [chunks, size, *rest]
    row_grads = tf.reshape(row_grads, tf.concat([[-1], tf.shape(row_grads)[2:]], axis=0))
    return [tf.ensure_shape(row_grads[:num_rows], per_row[0].shape), *sums]


# END
