"""Anderson acceleration of a fixed-point iteration, per example, with a safeguard.

With an example's last `k <= memory` iterates `x_i`, their images `s_i = step(x_i)` and residuals
`f_i = s_i - x_i`, the next iterate mixes the images with the weights that best cancel the
residuals (type II, damping 1):

    alpha = argmin ||sum_i alpha_i f_i||_2  subject to  sum_i alpha_i = 1,
    x_next = sum_i alpha_i s_i.

On a linear map this is GMRES, so it gains most where the plain iteration is slowest. The
signature and the convergence test are `fixed_point.plain`'s; see `anderson` for the safeguard.

References:
    Walker, Ni (2011). Anderson acceleration for fixed-point iterations. SIAM J. Numer. Anal.
    49(4), 1715-1735. https://doi.org/10.1137/10078356X
"""

import numpy as np
import tensorflow as tf

from tfp_resflow.core import validation
from tfp_resflow.solvers.fixed_point import Step, per_example_done

__all__ = ["ANDERSON_MEMORY", "ANDERSON_REGULARIZATION", "anderson"]

# Anderson's history length, a common choice: more costs memory (`[batch, 2 * memory, event]`) and
# a worse-conditioned least-squares problem, for little gain on a nonlinear map.
ANDERSON_MEMORY = 5
# Tikhonov term of Anderson's normal equations, relative (see `anderson`). Raised to a few ulps of
# the dtype of the solve: below, it would not change the rounded matrix, and two equal residuals
# would make it exactly singular, which `tf.linalg.solve` reports as an error.
ANDERSON_REGULARIZATION = 1e-10


class _Anderson:
    """One Anderson solve: the constants of the iteration and the pieces of its loop body.

    The loop state is `(i, x, is_plain, residuals, images, count, last_norm, done)`: the
    iteration, the current iterate, whether it is a plain step (never rejected), the history
    `[batch, memory, size]` of residuals and images (newest last, `count` valid per example),
    the residual norm of the last accepted iterate, and the converged flags.
    """

    def __init__(
        self, step: Step, start: tf.Tensor, tolerance: tf.Tensor, memory: int, *, safeguard: bool
    ) -> None:
        self.step, self.tolerance, self.memory, self.safeguard = step, tolerance, memory, safeguard
        self.dtype = start.dtype
        # The small least-squares problem in at least single precision: half-precision matrix
        # solves are not available, and its rounding is what the Tikhonov term must exceed.
        self.work = tf.float64 if self.dtype == tf.float64 else tf.float32
        eps = float(np.finfo(self.work.as_numpy_dtype).eps)
        self.regularization = max(ANDERSON_REGULARIZATION, 8 * eps)
        self.shape = tf.shape(start)
        self.batch = self.shape[0]
        self.slots = tf.range(memory)

    def flat(self, t: tf.Tensor) -> tf.Tensor:
        return tf.reshape(t, [self.batch, -1])

    def mix(self, residuals: tf.Tensor, images: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        """`sum_i alpha_i s_i` over each example's `count` newest entries (at the end)."""
        work = self.work
        valid = self.slots[None, :] >= self.memory - count[:, None]  # [batch, memory]
        valid_w = tf.cast(valid, work)
        f = tf.cast(residuals, work)
        norms = tf.where(valid, tf.norm(f, axis=2), tf.zeros([], work))
        # Solved for `u = D y`: the Gram matrix of the unit residuals has a unit diagonal (so
        # `lambda` is relative, and nothing under- or overflows), and its conditioning reflects
        # the angles between the residuals, not their magnitudes, which span orders of magnitude
        # over a history (with the plain Gram matrix the newest, smallest residuals would drown
        # in `lambda`).
        largest = tf.reduce_max(norms, axis=1, keepdims=True)
        relative = tf.math.divide_no_nan(norms, largest)
        relative = tf.where(relative > 0, relative, tf.ones_like(relative))
        unit = tf.math.divide_no_nan(f, norms[:, :, None])
        gram = tf.matmul(unit, unit, transpose_b=True)
        gram = tf.where(tf.math.is_finite(gram), gram, tf.zeros_like(gram))
        # Invalid slots get an identity row and a zero right-hand side, hence weight 0.
        gram = gram * valid_w[:, :, None] * valid_w[:, None, :] + tf.linalg.diag(
            self.regularization * valid_w + (1 - valid_w)
        )
        u = tf.linalg.solve(gram, (valid_w / relative)[:, :, None])[:, :, 0]
        y = u / relative
        alpha = y / tf.reduce_sum(y, axis=1, keepdims=True)
        mixed = tf.einsum("bm,bmn->bn", tf.cast(alpha, self.dtype), images)
        # A degenerate solve (sum(y) ~ 0) falls back to the plain step without spending an
        # evaluation of `step` on a non-finite point.
        finite = tf.reduce_all(tf.math.is_finite(alpha), axis=1, keepdims=True)
        return tf.where(finite, mixed, images[:, -1])

    def accepts(
        self, norm: tf.Tensor, is_plain: tf.Tensor, last_norm: tf.Tensor, done: tf.Tensor
    ) -> tf.Tensor:
        """The safeguard: a plain step, or an extrapolation whose residual did not grow."""
        if not self.safeguard:
            return tf.ones_like(done)
        return tf.math.is_finite(norm) & (is_plain | (norm <= last_norm))

    def update_history(
        self,
        push: tf.Tensor,
        reject: tf.Tensor,
        entries: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
        history: tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor],
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """Appends `(residual, image, norm)` where `push`; a rejection keeps only the newest."""
        residual, image, norm = entries
        residuals, images, count, last_norm = history

        def pushed(history: tf.Tensor, entry: tf.Tensor) -> tf.Tensor:
            rolled = tf.concat([history[:, 1:], entry[:, None]], axis=1)
            return tf.where(push[:, None, None], rolled, history)

        residuals = pushed(residuals, residual)
        images = pushed(images, self.flat(image))
        count = tf.where(push, tf.minimum(count + 1, self.memory), count)
        # A rejected example keeps only its newest accepted entry: the older ones led astray.
        count = tf.where(reject, tf.minimum(count, 1), count)
        last_norm = tf.where(push, norm, last_norm)
        return residuals, images, count, last_norm

    def body(
        self,
        i: tf.Tensor,
        x: tf.Tensor,
        is_plain: tf.Tensor,
        residuals: tf.Tensor,
        images: tf.Tensor,
        count: tf.Tensor,
        last_norm: tf.Tensor,
        done: tf.Tensor,
    ) -> tuple[tf.Tensor, ...]:
        """One evaluation of `step`: judge it, update the history, choose the next iterate."""
        image = self.step(x)
        converged = per_example_done(image, x, self.tolerance)
        residual = self.flat(image - x)
        norm = tf.norm(tf.cast(residual, self.work), axis=1)
        accept = self.accepts(norm, is_plain, last_norm, done)
        active = ~done
        newly_done = active & converged
        push = active & ~converged & accept
        reject = active & ~converged & ~accept
        residuals, images, count, last_norm = self.update_history(
            push, reject, (residual, image, norm), (residuals, images, count, last_norm)
        )
        newest = tf.where((count > 0)[:, None], images[:, -1], self.flat(x))
        following = tf.where(
            push[:, None],
            self.mix(residuals, images, count),
            tf.where(reject[:, None], newest, self.flat(x)),
        )
        following = tf.where(newly_done[:, None], self.flat(image), following)
        # Only the extrapolations are judged: a plain step (the first one of a history or a
        # fallback) always stands, which is what guarantees progress.
        is_plain = tf.where(push, count <= 1, tf.ones_like(is_plain))
        following = tf.reshape(following, self.shape)
        return i + 1, following, is_plain, residuals, images, count, last_norm, done | newly_done


def anderson(
    step: Step,
    start: tf.Tensor,
    scale: tf.Tensor,
    *,
    atol: float,
    rtol: float,
    max_iterations: int,
    memory: int = ANDERSON_MEMORY,
    safeguard: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Anderson-accelerated (type II) fixed-point iteration of `step`, per example.

    With an example's last `k <= memory` iterates `x_i`, their images `s_i = step(x_i)` and
    residuals `f_i = s_i - x_i` (events flattened to vectors), the next iterate mixes the images
    with the weights that best cancel the residuals (Walker & Ni, 2011, with damping 1):

        alpha = argmin ||sum_i alpha_i f_i||_2  subject to  sum_i alpha_i = 1,
        x_next = sum_i alpha_i s_i.

    On a linear map this is GMRES (Walker & Ni, 2011), so it gains most where the plain iteration
    is slowest, with the eigenvalues of `J_step` clustered near 1 on the real axis; with one
    entry (`k = 1`) it is the plain step. The weights come from the tiny normal equations of the
    constrained problem, a batch of `k x k` systems solved with `tf.linalg.solve`, with a
    Tikhonov term relative to each residual's norm:

        alpha = y / sum(y)  with  (F F^T + lambda diag(|f_i|^2)) y = 1,   F = [f_1; ...; f_k],

    solved as `(U U^T + lambda I) u = D^-1 1`, `y = D^-1 u`, with `U` the unit residuals and
    `D = diag(|f_i| / max_j |f_j|)`; `lambda` is `ANDERSON_REGULARIZATION`, or a few ulps of the
    dtype if larger.

    Safeguard: an extrapolation can leave the region where `step` contracts (a strongly nonlinear
    or non-smooth map) or is finite. An accelerated iterate whose residual norm is not finite or
    exceeds that of the last accepted iterate is rejected: the example takes the plain step from
    its last accepted iterate instead, and its history restarts from that iterate. (Comparing
    with the residual of that plain step would cost one more evaluation per iteration.) Plain
    steps are never rejected and each rejection costs one evaluation, so where every extrapolation
    is rejected the iteration still makes the plain iteration's progress, at half its speed.

    Convergence is judged as by `plain`: an example has converged when every element of
    `step(x) - x` is at most `atol + rtol * |scale|`, and its result is then that `step(x)`; it is
    frozen from then on. Every iteration evaluates `step` once (on the whole batch), so
    `max_iterations` caps the evaluations as for `plain`. The history costs
    `2 * memory * batch * event_size` elements.

    Args:
        step: the map, `[batch, *event] -> [batch, *event]`, examples independent.
        start: the first iterate, `[batch, *event]`.
        scale: tensor of the same shape setting the relative tolerance (e.g. the right-hand side).
        atol: absolute tolerance per element.
        rtol: relative tolerance per element.
        max_iterations: cap on the number of evaluations of `step`.
        memory: the number of iterates mixed (`k` above; 1 is the plain iteration).
        safeguard: reject the accelerated iterates that do not decrease the residual (off only
            to show what the safeguard prevents).

    Returns:
        `(x, converged)`: the result `[batch, *event]` (for an unconverged example, the plain
        step from its last accepted iterate) and a per-example flag of shape `[batch]`.

    Raises:
        ValueError: if `memory < 1`.

    References:
        Walker, Ni (2011). Anderson acceleration for fixed-point iterations. SIAM J. Numer. Anal.
        49(4), 1715-1735. https://doi.org/10.1137/10078356X
    """
    validation.integer("memory", memory, 1)
    iteration = _Anderson(step, start, atol + rtol * tf.abs(scale), memory, safeguard=safeguard)
    batch, dtype = iteration.batch, start.dtype
    size = start.shape[1:].num_elements()  # static where known, for the shapes in the loop
    if size is None:
        size = tf.reduce_prod(iteration.shape[1:])
    history = tf.zeros(tf.stack([batch, memory, size]), dtype)
    _, x, _, _, images, count, _, done = tf.while_loop(
        lambda i, *state: tf.logical_and(i < max_iterations, ~tf.reduce_all(state[-1])),
        iteration.body,
        (
            tf.constant(0),
            start,
            tf.ones([batch], tf.bool),
            history,
            history,
            tf.zeros([batch], tf.int32),
            tf.fill([batch], tf.constant(float("inf"), iteration.work)),
            tf.zeros([batch], tf.bool),
        ),
    )
    # An unconverged example returns the plain step from its last accepted iterate (as `plain`
    # returns its last step), not an extrapolation that may have been rejected.
    flat_x = iteration.flat(x)
    fallback = tf.where((count > 0)[:, None], images[:, -1], flat_x)
    x = tf.where(done[:, None], flat_x, fallback)
    return tf.reshape(x, iteration.shape), done
