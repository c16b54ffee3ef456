"""The passes of a residual block as traced functions, one trace per kind of `g`.

A residual block `x = y + g(y)` has three passes:

    joint(y, seed) -> (x, log_det)   data -> latent with the log-det: g evaluated once, by the
                                     estimator, whose g(y) is the value
    value(y)       -> x              data -> latent without the log-det
    solve(z)       -> x              latent -> data: x + g(x) = z by fixed-point iteration

For a conditional `g` (a Keras model of `[x, c]`, `network.lipschitz_mlp(context_size=K)`) each
pass also takes the flat context `c` (`[batch, K]`): the estimators and the solver see
`x -> g(x, c)` and list `c` among the tensors they differentiate, so the custom gradients (the
Neumann log-det gradient, the implicit gradient of the solve) reach `c` and every weight of the
context network.

Written as pure functions of `g`'s weight values (Keras' `stateless_call`), each pass is traced
once with `tf.function` and called by every block whose `g` has the same structure (the same
layer classes and `BlockConfig`, up to names): a multi-scale flow's 52 blocks need 5 traces, not 52.
The functions are not inlined into their caller (`_noinline`), so TensorFlow also optimises and
instantiates each of them once. Measured on a 20-block flow: tracing 10 s -> 0.5 s, first run
11 s -> 1.7 s, the same time per step after that.

Blocks whose `g` is not a Keras layer, or whose estimator is a callable of the user's, run the
same pure functions inline (variables read by `g` are found by the custom gradients).

Memory: the joint pass with the Neumann gradient keeps only the block's input, probe and
Neumann vector for the backward pass; the backward pass recomputes `g` (see `logdet`), so the
activations of one block at a time are alive.
"""

import functools
import json
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras.src.models.functional import Functional  # the class of keras.Model(inputs, outputs)

from tfp_resflow.configs.flow_configs import BlockConfig
from tfp_resflow.core import stateless_random
from tfp_resflow.estimators import logdet
from tfp_resflow.layers.activation import CLipSwish, LipSwish
from tfp_resflow.layers.dense_network import LipschitzDenseLayer
from tfp_resflow.layers.lipschitz import SpectralConv2D, SpectralDense, spectral_layers
from tfp_resflow.layers.norm_order import NormOrder
from tfp_resflow.layers.spectral_layer import effective_kernels_given
from tfp_resflow.solvers import solver

__all__ = ["BlockFunctions", "block_functions", "structure_key", "with_context"]

# Layer classes whose `get_config()` determines their `call` completely, so two layers with equal
# configurations (up to names) compute the same function of their weights.
_SHAREABLE_LAYERS = (
    keras.Sequential,
    keras.layers.InputLayer,
    keras.layers.Activation,
    keras.layers.Identity,
    keras.layers.Dense,
    keras.layers.Conv2D,
    keras.layers.Add,
    keras.layers.Reshape,
    Functional,
    SpectralDense,
    SpectralConv2D,
    LipSwish,
    CLipSwish,
    NormOrder,
    LipschitzDenseLayer,
)
# Keep each function a call at run time, so that the runtime optimises and instantiates it once.
_NOT_INLINED = {"_noinline": True}


def _strip_names(config: Any) -> Any:
    if isinstance(config, dict):
        return {
            k: _strip_names(v) for k, v in config.items() if k not in ("name", "shared_object_id")
        }
    if isinstance(config, list | tuple):
        return [_strip_names(v) for v in config]
    return config


def structure_key(g: object) -> str | None:
    """A key equal for two built `g`s exactly when one traced function computes both.

    Defined for Keras layers made of `_SHAREABLE_LAYERS` only (configuration without names,
    plus the shapes and dtypes of the weights); None for anything else.
    """
    if not isinstance(g, keras.layers.Layer) or not g.built:
        return None
    layers = g._flatten_layers(include_self=True, recursive=True)  # noqa: SLF001 (Keras API)
    if not all(type(layer) in _SHAREABLE_LAYERS for layer in layers):
        return None
    weights = [
        (tuple(w.shape), str(w.dtype), bool(w.trainable))
        for w in g.trainable_variables + g.non_trainable_variables
    ]
    config = _strip_names(g.get_config())
    return json.dumps([type(g).__name__, config, weights], sort_keys=True, default=repr)


def with_context(g: Callable, context: tf.Tensor) -> Callable[[tf.Tensor], tf.Tensor]:
    """`x -> g([x, c])` for a conditional `g`, `c` tiled to the batch of `x`.

    The series estimators evaluate `g` on the batch tiled once per probe (`[P * B, ...]`,
    `series._tile`), so the context is tiled the same way.
    """

    def g_given_context(x: tf.Tensor) -> tf.Tensor:
        repeats = tf.shape(x)[0] // tf.shape(context)[0]
        return g([x, tf.tile(context, [repeats, 1])])

    return g_given_context


def joint_pass(
    residual_fn: Callable[[tf.Tensor], tf.Tensor],
    y: tf.Tensor,
    seed: Any,
    estimator: logdet.LogDetFn,
    parameters: Sequence[tf.Tensor] = (),
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(y + g(y), log|det(I + J_g(y))|)` with `g(y)` evaluated once, by the estimator.

    Shapes: `y` `[batch, *event]`; returns `[batch, *event]` and `[batch]`.
    """
    if parameters:
        gy, log_det = estimator(residual_fn, y, seed=seed, parameters=parameters)
    else:  # a user's estimator need not know `parameters`
        gy, log_det = estimator(residual_fn, y, seed=seed)
    return y + gy, log_det


class BlockFunctions:
    """The passes of residual blocks that share a kind of `g` and their `BlockConfig`.

    Args:
        template: `g` of the first block of this kind (its structure serves them all).
        config: the blocks' estimators and solver.
        traced: trace the passes as `tf.function`s of the weight values (requires a built Keras
            layer and named estimators); otherwise the passes run inline with the block's `g`.
    """

    def __init__(self, template: Callable, config: BlockConfig, *, traced: bool) -> None:
        self.config = config
        self.traced = traced
        self._template = template
        if traced:
            trace = functools.partial(
                tf.function,
                autograph=False,
                reduce_retracing=True,
                experimental_attributes=_NOT_INLINED,
            )
            self._joint = {
                True: trace(functools.partial(self._traced_joint, training=True)),
                False: trace(functools.partial(self._traced_joint, training=False)),
            }
            # (functools.partial: TF counts retracing per Python code object, which every
            # instance's bound methods share; each instance traces once per kind of input.)
            self._value = trace(functools.partial(self._traced_value))
            self._solve = trace(functools.partial(self._traced_solve))

    # -- the public passes: `g` is the calling block's own residual function -------------------

    def joint(
        self,
        g: Callable,
        y: tf.Tensor,
        seed: Any,
        *,
        training: bool,
        context: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """`(y + g(y), log_det)`, `[batch, *event] -> ([batch, *event], [batch])`."""
        if not self.traced:
            g, parameters = _inline(g, context)
            return joint_pass(g, y, seed, self._estimator(training, y), parameters)
        seed = stateless_random.sanitize_seed(seed)
        return self._joint[training](y, seed, context, *self._weights(g))

    def value(self, g: Callable, y: tf.Tensor, context: tf.Tensor | None = None) -> tf.Tensor:
        """`y + g(y)`."""
        if not self.traced:
            return y + _inline(g, context)[0](y)
        return self._value(y, context, *self._weights(g))

    def solve(
        self,
        g: Callable,
        z: tf.Tensor,
        start: tf.Tensor | None,
        context: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """`(x, converged)` with `x + g(x) = z`; see `solver.solve_residual`."""
        if not self.traced:
            return self._solve_with(*_inline(g, context), z, start)
        return self._solve(z, start, context, *self._weights(g))

    # -- helpers -----------------------------------------------------------------------------

    def _estimator(self, training: bool, y: tf.Tensor) -> logdet.LogDetFn:  # noqa: FBT001
        event_size = y.shape[1:].num_elements()
        return self.config.estimator(training=training, event_size=event_size or 2**31)

    def _weights(self, g: keras.layers.Layer) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """The values of `g`'s weights, read now (so gradients reach the variables)."""
        trainable = [tf.convert_to_tensor(w) for w in g.trainable_variables]
        non_trainable = [tf.convert_to_tensor(w) for w in g.non_trainable_variables]
        return trainable, non_trainable

    def _stateless_g(
        self,
        trainable: list[tf.Tensor],
        non_trainable: list[tf.Tensor],
        context: tf.Tensor | None,
        *,
        kernels_given: bool = False,
    ) -> tuple[Callable[[tf.Tensor], tf.Tensor], list[tf.Tensor]]:
        """`g` as a function of `x` alone, and the tensors it reads that need gradients.

        `kernels_given`: `trainable` holds the Lipschitz layers' effective kernels in place of
        their kernels (`_with_effective_kernels`), used as they are.
        """

        def g(t: tf.Tensor) -> tf.Tensor:
            if kernels_given:
                with effective_kernels_given():
                    return self._template.stateless_call(trainable, non_trainable, t)[0]
            return self._template.stateless_call(trainable, non_trainable, t)[0]

        if context is None:
            return g, list(trainable)
        return with_context(g, context), [*trainable, context]

    def _solve_with(
        self, g: Callable, parameters: Sequence, z: tf.Tensor, start: tf.Tensor | None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        s = self.config
        atol, rtol = solver.tolerances(z.dtype, s.atol, s.rtol)
        return solver.solve_residual(
            g,
            z,
            start=start,
            parameters=parameters,
            atol=atol,
            rtol=rtol,
            max_iterations=s.max_iterations,
            gradient_check=s.on_nonconvergence == "raise",
            solver=s.solver,
            jit_compile=s.solver_jit_compile,
        )

    # -- traced bodies -----------------------------------------------------------------------

    def _traced_joint(
        self,
        y: tf.Tensor,
        seed: tf.Tensor,
        context: tf.Tensor | None,
        trainable: list[tf.Tensor],
        non_trainable: list[tf.Tensor],
        *,
        training: bool,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        g, parameters = self._stateless_g(trainable, non_trainable, context)
        return joint_pass(g, y, seed, self._estimator(training, y), parameters)

    def _traced_value(
        self,
        y: tf.Tensor,
        context: tf.Tensor | None,
        trainable: list[tf.Tensor],
        non_trainable: list[tf.Tensor],
    ) -> tf.Tensor:
        return y + self._stateless_g(trainable, non_trainable, context)[0](y)

    def _traced_solve(
        self,
        z: tf.Tensor,
        start: tf.Tensor | None,
        context: tf.Tensor | None,
        trainable: list[tf.Tensor],
        non_trainable: list[tf.Tensor],
    ) -> tuple[tf.Tensor, tf.Tensor]:
        # W_eff depends on the weights alone: computed once here, not in each of the solver's
        # evaluations of g (each would recompute sigma, a product with the power vector and
        # two norms per layer: measured on the trained digits model, about a fifth of the CPU
        # time of 64 samples and of their first call's tracing). The implicit gradient reaches
        # the kernels through W_eff's own ops.
        trainable = self._with_effective_kernels(trainable, non_trainable)
        g, parameters = self._stateless_g(trainable, non_trainable, context, kernels_given=True)
        return self._solve_with(g, parameters, z, start)

    def _with_effective_kernels(
        self, trainable: list[tf.Tensor], non_trainable: list[tf.Tensor]
    ) -> list[tf.Tensor]:
        """`trainable` with each Lipschitz layer's kernel W replaced by its W_eff."""
        template = self._template
        position = {id(w): i for i, w in enumerate(template.trainable_variables)}
        mapping = [
            *zip(template.trainable_variables, trainable, strict=True),
            *zip(template.non_trainable_variables, non_trainable, strict=True),
        ]
        values = list(trainable)
        with keras.StatelessScope(state_mapping=mapping):
            for layer in spectral_layers(template):
                values[position[id(layer.kernel)]] = layer.effective_kernel()
        return values


def _inline(g: Callable, context: tf.Tensor | None) -> tuple[Callable, tuple[tf.Tensor, ...]]:
    """An untraced `g` of `x` alone, and the tensors it reads that need gradients.

    (The variables it reads are found by the custom gradients themselves.)
    """
    if context is None:
        return g, ()
    return with_context(g, context), (context,)


# Shared functions live as long as some block uses them.
_SHARED: "weakref.WeakValueDictionary[tuple, BlockFunctions]" = weakref.WeakValueDictionary()


def block_functions(g: Callable, config: BlockConfig) -> BlockFunctions:
    """The `BlockFunctions` for a block with residual function `g` and `config`.

    Blocks whose `g` has the same `structure_key` and equal configs share one instance (and
    so one trace of each pass); other Keras layers get their own traced functions; anything
    else runs inline.
    """
    traced = config.traceable and isinstance(g, keras.layers.Layer) and g.built
    key = structure_key(g) if traced else None
    if key is None:
        return BlockFunctions(g, config, traced=traced)
    shared = _SHARED.get((key, config))
    if shared is None:
        shared = BlockFunctions(g, config, traced=True)
        _SHARED[(key, config)] = shared
    return shared
