"""The model configurations: frozen dataclasses, one per concept.

    BlockConfig          what every residual block computes besides `g`: the training and
                         evaluation log-det estimators with their options, the fixed-point
                         solver with its tolerances, and what to do when it does not converge
    ResidualFlowConfig   `ResidualFlowBijector` (vector events): its blocks' `g` and a BlockConfig
    ImageFlowConfig      `MultiscaleResidualFlow` (images): scales, `g`s and a BlockConfig

Each validates itself on construction, so a bad value fails where it is written. The same field
names serve the constructors (`ResidualFlowBijector(num_blocks=4, solver="anderson")`), the
saved configurations and the command line (`train_tf.py --model num_blocks=4`), through
`tfp_resflow.configs.config_fields`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from tfp_resflow.core import validation
from tfp_resflow.core.context import check_context_size
from tfp_resflow.estimators import logdet
from tfp_resflow.layers.activation import ACTIVATIONS
from tfp_resflow.layers.dense_network import linear_widths
from tfp_resflow.layers.spectral_layer import LIPSCHITZ_ESTIMATES
from tfp_resflow.solvers import solver

__all__ = ["NETWORKS", "BlockConfig", "ImageFlowConfig", "ResidualFlowConfig"]

ON_NONCONVERGENCE = ("raise", "nan")
# Kinds of residual function g: Chen et al.'s ("resnet", `tfp_resflow.layers.network`) or the
# i-DenseNet block of Perugachi-Diaz et al. ("dense", `tfp_resflow.layers.dense_network`).
NETWORKS = ("resnet", "dense")


def _namer(config: object) -> Callable[[str], str]:
    return lambda field: f"{type(config).__name__}.{field}"


def _check_lipschitz_estimate(config: object, norm_orders: object) -> None:
    """`lipschitz_estimate` is a known name; "gram" needs the (2, 2) norms it bounds."""
    n = _namer(config)
    validation.choice(n("lipschitz_estimate"), config.lipschitz_estimate, LIPSCHITZ_ESTIMATES)
    if config.lipschitz_estimate != "gram":
        return
    if config.learnable_norm_orders:
        validation.fail(
            n("learnable_norm_orders"), "False with lipschitz_estimate='gram'", value=True
        )
    if norm_orders is not None and any(float(p) != 2.0 for p in norm_orders):
        validation.fail(
            n("norm_orders"), "None or all 2 with lipschitz_estimate='gram'", norm_orders
        )


def _check_network(config: object, growths: str, widths: tuple[int, ...]) -> None:
    """Checks `network`, `learnable_concatenation` and, for "dense", what the block needs.

    A dense g bounds its concatenations in l2 only, so it takes no other norm orders; its
    growths `widths` (the field `growths`) must suit the activation (even for CLipSwish).
    """
    n = _namer(config)
    validation.choice(n("network"), config.network, NETWORKS)
    validation.boolean(n("learnable_concatenation"), config.learnable_concatenation)
    if config.network != "dense":
        return
    if config.learnable_norm_orders:
        validation.fail(n("learnable_norm_orders"), "False with network='dense'", value=True)
    if getattr(config, "norm_orders", None) is not None:
        validation.fail(n("norm_orders"), "None with network='dense'", config.norm_orders)
    linear_widths(n(growths), widths, config.activation)


def _check_context(config: object) -> None:
    """Checks `context_size` and `context_hidden_units` (conditional flows: resnet g only)."""
    n = _namer(config)
    check_context_size(n("context_size"), config.context_size)
    validation.integers(n("context_hidden_units"), config.context_hidden_units, nonempty=False)
    if config.context_size is not None and config.network != "resnet":
        validation.fail(n("network"), "'resnet' with a context_size", config.network)


def _normalise(config: object) -> None:
    """Lists (from JSON or the command line) to tuples; a dict `block` to a BlockConfig."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, list):
            object.__setattr__(config, field.name, tuple(value))
        elif field.name == "block" and isinstance(value, Mapping):
            object.__setattr__(config, field.name, BlockConfig(**value))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Settings of every residual block: estimators, solver (defaults: the authors' block).

    Args:
        log_det: training estimator, a name of `logdet.ESTIMATORS` ("unbiased": Russian
            roulette; "exact": full Jacobian, small events; "truncated": the biased i-ResNet
            series) or a callable with the `logdet` signature (not serialisable).
        num_exact_terms: series terms the roulette always computes.
        term_distribution: distribution of the roulette's extra terms, "geometric" or "poisson".
        geometric_p: success probability of the geometric distribution, in (0, 1).
        poisson_rate: rate of the Poisson distribution, > 0.
        num_terms: terms of the truncated series.
        probe: Hutchinson probes, "rademacher" (lower variance) or "gaussian" (the authors').
        num_probes: probes per example, averaged.
        neumann_gradient: the memory-flat Neumann gradient (else autodiff through the series).
        backward_slice_size: at most this many examples (times probes) at once in the Neumann
            backward, which recomputes and differentiates `g` in equal slices of the batch, one
            after another: the same gradients, the activations of one slice alive at a time
            (the `mnist` preset's peak memory; `series`). None: the whole batch at once.
        eval_log_det: evaluation estimator: "auto" (exact for events of at most
            `logdet.EVAL_EXACT_MAX_EVENT_SIZE` dimensions, else the roulette with
            `eval_num_exact_terms` exact terms, as the authors evaluate) or a name as `log_det`.
        eval_num_exact_terms: exact terms of the evaluation roulette.
        solver: fixed-point solver of the inverse and of its implicit gradient, a name of
            `solver.SOLVERS` ("plain" iteration or "anderson" acceleration).
        atol: absolute tolerance of the solver; None: by dtype (`solver.DEFAULT_TOLERANCE`).
            It is the inverse's accuracy: the solve of `x + g(x) = z` stops when a step moves
            every element by at most `atol + rtol |z|`, and that step is the reconstruction
            error `x_k + g(x_k) - z` of the iterate before the returned one (whose own error is
            at most `Lip(g)` times that, in g's norm).
        rtol: relative tolerance of the solver; None: by dtype.
        max_iterations: cap on the solver's iterations.
        solver_jit_compile: compile the solver's iteration with XLA (`jit_compile`); the
            implicit gradient and the convergence checks stay uncompiled.
        on_nonconvergence: "raise" an error naming the largest residual, or return "nan" for
            the examples that did not converge (they are NaN in either case).
    """

    log_det: str | logdet.LogDetFn = "unbiased"
    num_exact_terms: int = 2
    term_distribution: str = "geometric"
    geometric_p: float = 0.5
    poisson_rate: float = 2.0
    num_terms: int = 10
    probe: str = "rademacher"
    num_probes: int = 1
    neumann_gradient: bool = True
    backward_slice_size: int | None = None
    eval_log_det: str = "auto"
    eval_num_exact_terms: int = logdet.EVAL_NUM_EXACT_TERMS
    solver: str = "plain"
    atol: float | None = None
    rtol: float | None = None
    max_iterations: int = 1000
    solver_jit_compile: bool = False
    on_nonconvergence: str = "raise"

    def __post_init__(self) -> None:
        n = _namer(self)
        if not callable(self.log_det):
            validation.choice(n("log_det"), self.log_det, logdet.LOG_DET_NAMES, extra="a callable")
        validation.integer(n("num_exact_terms"), self.num_exact_terms, 0)
        validation.choice(n("term_distribution"), self.term_distribution, logdet.DISTRIBUTIONS)
        validation.number(n("geometric_p"), self.geometric_p, above=0, below=1)
        validation.number(n("poisson_rate"), self.poisson_rate, above=0)
        validation.integer(n("num_terms"), self.num_terms, 1)
        validation.choice(n("probe"), self.probe, logdet.PROBES)
        validation.integer(n("num_probes"), self.num_probes, 1)
        validation.boolean(n("neumann_gradient"), self.neumann_gradient)
        validation.optional(
            validation.integer, n("backward_slice_size"), self.backward_slice_size, 1
        )
        validation.choice(n("eval_log_det"), self.eval_log_det, logdet.EVAL_LOG_DET_NAMES)
        validation.integer(n("eval_num_exact_terms"), self.eval_num_exact_terms, 0)
        validation.choice(n("solver"), self.solver, solver.SOLVER_NAMES)
        validation.optional(validation.number, n("atol"), self.atol, at_least=0)
        validation.optional(validation.number, n("rtol"), self.rtol, at_least=0)
        validation.integer(n("max_iterations"), self.max_iterations, 1)
        validation.boolean(n("solver_jit_compile"), self.solver_jit_compile)
        validation.choice(n("on_nonconvergence"), self.on_nonconvergence, ON_NONCONVERGENCE)

    @property
    def traceable(self) -> bool:
        """Whether the estimators are this package's (named), which take `parameters`."""
        return isinstance(self.log_det, str)

    def estimator(self, *, training: bool, event_size: int) -> logdet.LogDetFn:
        """The training estimator, or the evaluation estimator for events of `event_size`."""
        if training:
            return logdet.make_log_det_fn(self.log_det, self.estimator_options(self.log_det))
        name = logdet.eval_log_det_name(self.eval_log_det, event_size)
        options = self.estimator_options(name)
        if name == "unbiased":  # the authors' evaluation: more exact terms, no gradient needed
            options.update(num_exact_terms=self.eval_num_exact_terms, neumann_gradient=False)
        return logdet.make_log_det_fn(name, options)

    def estimator_options(self, log_det: str | logdet.LogDetFn) -> dict[str, Any]:
        """This config's values of the options that the estimator `log_det` takes."""
        if callable(log_det):
            return {}
        return {key: getattr(self, key) for key in logdet.ESTIMATORS[log_det].options}


@dataclasses.dataclass(frozen=True)
class ResidualFlowConfig:
    """Settings of a `ResidualFlowBijector` (vector events).

    Args:
        num_blocks: residual blocks.
        hidden_units: widths of the hidden layers of each block's `g`; with
            `network="dense"`, the growth of each dense layer (features it appends; even for
            CLipSwish), one dense layer per entry.
        lipschitz_constant: `c` in (0, 1) bounding every linear layer's norm (Chen et al.: 0.9
            for 2-D data, 0.98 for images).
        activation: 1-Lipschitz activation of `g`, a name in `activation.ACTIVATIONS`.
        norm_orders: orders of the norms at the boundaries of each `g`'s linear layers
            (`len(hidden_units) + 2` of them, first = last, numbers or "inf"); None: all 2.
        learnable_norm_orders: learn those orders, starting from `norm_orders`.
        actnorm: an ActNorm before the first block and after every block.
        network: kind of `g`: "resnet" (`network.lipschitz_mlp`) or "dense" (the i-DenseNet
            block, `dense_network.dense_mlp`; l2 norms only).
        learnable_concatenation: with `network="dense"`, learn the concatenation weights
            (else both fixed at c / sqrt(2)); see `dense_network.LipschitzDenseLayer`.
        context_size: K for a conditional flow p(x | c) with contexts of shape `[..., K]`
            (`network.lipschitz_mlp(context_size=K)`; `network="resnet"` only); None: p(x).
        context_hidden_units: hidden widths of each block's context network.
        block: the blocks' estimators and solver.
        lipschitz_estimate: what each Lipschitz layer divides by: "power" (the authors'
            power-iteration estimate, a lower bound) or "gram" (the Gram iteration's upper
            bound, recomputed in every call, so every layer keeps its constant at every step;
            (2, 2) norms only; `tfp_resflow.layers.spectral_layer`).
    """

    num_blocks: int = 8
    hidden_units: tuple[int, ...] = (128, 128)
    lipschitz_constant: float = 0.9
    activation: str = "lipswish"
    norm_orders: tuple[float | str, ...] | None = None
    learnable_norm_orders: bool = False
    actnorm: bool = True
    network: str = "resnet"
    learnable_concatenation: bool = True
    context_size: int | None = None
    context_hidden_units: tuple[int, ...] = (64,)
    block: BlockConfig = BlockConfig()
    lipschitz_estimate: str = "power"

    def __post_init__(self) -> None:
        _normalise(self)
        n = _namer(self)
        validation.integer(n("num_blocks"), self.num_blocks, 1)
        validation.integers(n("hidden_units"), self.hidden_units, minimum=1, nonempty=False)
        validation.number(n("lipschitz_constant"), self.lipschitz_constant, above=0, below=1)
        validation.choice(n("activation"), self.activation, tuple(ACTIVATIONS))
        validation.boolean(n("learnable_norm_orders"), self.learnable_norm_orders)
        validation.boolean(n("actnorm"), self.actnorm)
        _check_network(self, "hidden_units", self.hidden_units)
        _check_context(self)
        _check_lipschitz_estimate(self, self.norm_orders)
        if self.network == "dense" and not self.hidden_units:
            validation.fail(n("hidden_units"), "non-empty with network='dense'", ())
        if not isinstance(self.block, BlockConfig):
            validation.fail(n("block"), "a BlockConfig", self.block)


@dataclasses.dataclass(frozen=True)
class ImageFlowConfig:
    """Settings of a `MultiscaleResidualFlow` (defaults: the authors' CIFAR-10 model).

    Args:
        blocks_per_scale: residual blocks at each scale; its length is the number of scales.
        hidden_channels: channels of the hidden convolutions of each `g` ("idim", 512); with
            `network="dense"`, the growth of each dense layer (172 in the paper; even for
            CLipSwish).
        kernel_sizes: odd kernel size of each convolution of `g`, first to last (3, 1, 3);
            with `network="dense"`, each dense layer's kernel then the last convolution's
            (the paper's 3, 3, 3, 1: three dense layers).
        lipschitz_constant: bound c in (0, 1) on the norm of every linear layer ("coeff").
        activation: 1-Lipschitz activation of `g`, a name in `activation.ACTIVATIONS`.
        learnable_norm_orders: learn the norm orders of every `g` from 2 (the authors'
            `--learn-p`, off in their image runs); see `tfp_resflow.layers.norm_order`.
        actnorm: ActNorm before the first block and after every block.
        factor_out: after each scale but the last, half of the channels leave as latents.
        squeeze_first: squeeze the image once before the first scale.
        fc_end_blocks: fully connected residual blocks after the last scale (0: none).
        fc_hidden_units: hidden widths of each fully connected `g` (the authors' 128, 128);
            with `network="dense"`, the width of the linear projection the fully connected
            `g` starts with, then the growth of each dense layer (the paper's 64, 32, 32, 32).
        logit_alpha: alpha of the `LogitTransform` applied first; None for no logit.
        num_levels: k, discrete levels per dimension of the data (256 for 8-bit images). The
            flow does not use it; `FlowModel(..., num_levels=k)` and the data pipeline do.
        initial_power_iterations: power iterations of every Lipschitz layer when it is built;
            None converges them (to 1e-6, slow for large models), 0 defers everything to the
            first `update_lipschitz` call (see `lipschitz.SpectralDense`).
        network: kind of every `g`: "resnet" (`network.lipschitz_cnn`, `lipschitz_mlp`) or
            "dense" (the i-DenseNet blocks of `dense_network`; l2 norms only).
        learnable_concatenation: with `network="dense"`, learn the concatenation weights.
        context_size: K for a class- or attribute-conditional flow p(x | c) with context
            vectors `[..., K]` (e.g. one-hot labels), broadcast over space in every `g`
            (`network="resnet"` only); None: p(x).
        context_hidden_units: hidden widths of each block's context network.
        lipschitz_estimate: what each Lipschitz layer divides by: "power" (the authors'
            power-iteration estimate, a lower bound) or "gram" (the Gram iteration's upper
            bound, recomputed in every call, so every layer keeps its constant at every step;
            (2, 2) norms only; `tfp_resflow.layers.spectral_layer`).
        block: every block's estimators and solver (the authors' images: the roulette with
            Poisson(2) extra terms after 2 exact ones and Gaussian probes).
    """

    blocks_per_scale: tuple[int, ...] = (16, 16, 16)
    hidden_channels: int = 512
    kernel_sizes: tuple[int, ...] = (3, 1, 3)
    lipschitz_constant: float = 0.98
    activation: str = "lipswish"
    learnable_norm_orders: bool = False
    actnorm: bool = True
    factor_out: bool = False
    squeeze_first: bool = False
    fc_end_blocks: int = 4
    fc_hidden_units: tuple[int, ...] = (128, 128)
    logit_alpha: float | None = 0.05
    num_levels: int = 256
    initial_power_iterations: int | None = None
    network: str = "resnet"
    learnable_concatenation: bool = True
    context_size: int | None = None
    context_hidden_units: tuple[int, ...] = (64,)
    block: BlockConfig = BlockConfig(term_distribution="poisson", probe="gaussian")
    lipschitz_estimate: str = "power"

    def __post_init__(self) -> None:
        _normalise(self)
        n = _namer(self)
        validation.integers(n("blocks_per_scale"), self.blocks_per_scale, minimum=1)
        validation.integer(n("hidden_channels"), self.hidden_channels, 1)
        validation.integers(n("kernel_sizes"), self.kernel_sizes, odd=True)
        validation.number(n("lipschitz_constant"), self.lipschitz_constant, above=0, below=1)
        validation.choice(n("activation"), self.activation, tuple(ACTIVATIONS))
        for name in ("learnable_norm_orders", "actnorm", "factor_out", "squeeze_first"):
            validation.boolean(n(name), getattr(self, name))
        if self.learnable_norm_orders and self.activation == "clipswish":
            validation.fail(
                n("learnable_norm_orders"),
                "False with clipswish (1-Lipschitz in l2 only)",
                self.learnable_norm_orders,
            )
        validation.integer(n("fc_end_blocks"), self.fc_end_blocks, 0)
        validation.integers(n("fc_hidden_units"), self.fc_hidden_units, nonempty=False)
        alpha = self.logit_alpha
        validation.optional(validation.number, n("logit_alpha"), alpha, at_least=0, below=0.5)
        validation.integer(n("num_levels"), self.num_levels, 2)
        iterations = self.initial_power_iterations
        validation.optional(validation.integer, n("initial_power_iterations"), iterations, 0)
        _check_network(self, "hidden_channels", (self.hidden_channels,))
        _check_lipschitz_estimate(self, None)
        _check_context(self)
        if self.network == "dense":
            if len(self.kernel_sizes) < 2:
                validation.fail(
                    n("kernel_sizes"), "at least 2 sizes with network='dense'", self.kernel_sizes
                )
            if self.fc_end_blocks and not self.fc_hidden_units:
                validation.fail(
                    n("fc_hidden_units"), "non-empty with network='dense'", self.fc_hidden_units
                )
            linear_widths(n("fc_hidden_units"), self.fc_hidden_units[1:], self.activation)
        if not isinstance(self.block, BlockConfig):
            validation.fail(n("block"), "a BlockConfig", self.block)
