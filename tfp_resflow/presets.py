"""`ImageFlowConfig` and the named image-flow configurations (Chen et al. 2019, and digits).

    flow = multiscale.image_flow((28, 28, 1), "mnist")   # a MultiscaleResidualFlow
    model = FlowModel(flow, (28, 28, 1), loss_unit="bits_per_dim", num_levels=256)

`PRESETS[name]` is an `ImageFlowConfig`, `PRESET_INPUT_SHAPES[name]` its image shape.

The paper presets reproduce the authors' `train_img.py` commands (README of
rtqichen/residual-flows): LipSwish (ELU for CelebA-HQ), coefficient 0.98, hidden width 512 with
kernels 3-1-3, ActNorm after every block, 4 fully connected end blocks of width 128 (two hidden
layers), and the unbiased estimator with Poisson(2) extra terms after 2 exact ones (8 for
CelebA-HQ) and Gaussian probes, as the authors draw them. Their 8-bit data have 256 levels;
CelebA-HQ is reduced to 5 bits (32 levels). The logit's alpha is 1e-6 for MNIST, 0.05 else.

They build with 10 power iterations per Lipschitz layer instead of converging (the authors'
tolerance 1e-3 stops after about 8), so that the 16-100 M parameter models build in seconds to
minutes on a CPU; training refines the estimates after every step.

`digits` is not from the paper: a model for the 8x8 scikit-learn digits (17 levels) that
trains in a few minutes on 2 CPU cores.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from tfp_resflow.activation import ACTIVATIONS

__all__ = ["PRESETS", "PRESET_INPUT_SHAPES", "ImageFlowConfig", "get_preset"]

LOG_DETS = ("unbiased", "exact")
TERM_DISTRIBUTIONS = ("poisson", "geometric")
PROBES = ("gaussian", "rademacher")


def _is_int(value: object, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


@dataclasses.dataclass(frozen=True)
class ImageFlowConfig:
    """Settings of a `MultiscaleResidualFlow` (defaults: the authors' CIFAR-10 model).

    Args:
        blocks_per_scale: residual blocks at each scale; its length is the number of scales.
        hidden_channels: channels of the hidden convolutions of each `g` ("idim", 512).
        kernel_sizes: odd kernel size of each convolution of `g`, first to last (3, 1, 3).
        lipschitz_constant: bound c in (0, 1) on the norm of every linear layer ("coeff").
        activation: 1-Lipschitz activation of `g`, a name in `activation.ACTIVATIONS`.
        learnable_norm_orders: learn the norm orders of every `g` from 2 (the authors'
            `--learn-p`, off in their image runs); see `tfp_resflow.norm_order`.
        actnorm: ActNorm before the first block and after every block.
        factor_out: after each scale but the last, half of the channels leave as latents.
        squeeze_first: squeeze the image once before the first scale.
        fc_end_blocks: fully connected residual blocks after the last scale (0: none).
        fc_hidden_units: hidden widths of each fully connected `g` (the authors' 128, 128).
        logit_alpha: alpha of the `LogitTransform` applied first; None for no logit.
        num_levels: k, discrete levels per dimension of the data (256 for 8-bit images). The
            flow does not use it; `FlowModel(..., num_levels=k)` and the data pipeline do.
        log_det: training estimator of every block, "unbiased" (Russian roulette) or "exact"
            (small images only). Evaluation always uses the blocks' "auto" estimator.
        num_exact_terms: series terms always computed by the unbiased estimator.
        term_distribution: distribution of the number of extra terms, "poisson" or "geometric".
        poisson_rate: rate of the Poisson distribution.
        geometric_p: success probability of the geometric distribution.
        probe: Hutchinson probes, "gaussian" (the authors') or "rademacher" (lower variance).
        initial_power_iterations: power iterations of every Lipschitz layer when it is built;
            None converges them (to 1e-6, slow for large models), 0 defers everything to the
            first `update_lipschitz` call (see `lipschitz.SpectralDense`).
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
    log_det: str = "unbiased"
    num_exact_terms: int = 2
    term_distribution: str = "poisson"
    poisson_rate: float = 2.0
    geometric_p: float = 0.5
    probe: str = "gaussian"
    initial_power_iterations: int | None = None

    def __post_init__(self) -> None:
        for name in ("blocks_per_scale", "kernel_sizes", "fc_hidden_units"):
            value = getattr(self, name)
            if isinstance(value, list):  # JSON gives lists; the config holds tuples
                object.__setattr__(self, name, tuple(value))
        self._check(self._problem())

    def _check(self, problem: tuple[str, str] | None) -> None:
        if problem is not None:
            name, expected = problem
            raise ValueError(
                f"ImageFlowConfig.{name} must be {expected}; got {getattr(self, name)!r}."
            )

    def _problem(self) -> tuple[str, str] | None:  # noqa: C901 (one check per field)
        def ints(value: object, minimum: int) -> bool:
            return isinstance(value, tuple) and all(_is_int(n, minimum) for n in value)

        if not (ints(self.blocks_per_scale, 1) and self.blocks_per_scale):
            return "blocks_per_scale", "a non-empty tuple of integers >= 1"
        if not _is_int(self.hidden_channels, 1):
            return "hidden_channels", "an integer >= 1"
        if not (ints(self.kernel_sizes, 1) and self.kernel_sizes):
            return "kernel_sizes", "a non-empty tuple of odd integers"
        if any(k % 2 == 0 for k in self.kernel_sizes):
            return "kernel_sizes", "a non-empty tuple of odd integers"
        if not (_is_number(self.lipschitz_constant) and 0 < self.lipschitz_constant < 1):
            return "lipschitz_constant", "a number in (0, 1)"
        if self.activation not in ACTIVATIONS:
            return "activation", f"one of {sorted(ACTIVATIONS)}"
        if self.learnable_norm_orders and self.activation == "clipswish":
            return "learnable_norm_orders", "False with clipswish (1-Lipschitz in l2 only)"
        for name in ("learnable_norm_orders", "actnorm", "factor_out", "squeeze_first"):
            if not isinstance(getattr(self, name), bool):
                return name, "a bool"
        if not _is_int(self.fc_end_blocks, 0):
            return "fc_end_blocks", "an integer >= 0"
        if not ints(self.fc_hidden_units, 1):
            return "fc_hidden_units", "a tuple of integers >= 1"
        alpha = self.logit_alpha
        if alpha is not None and not (_is_number(alpha) and 0 <= alpha < 0.5):
            return "logit_alpha", "None or a number in [0, 0.5)"
        if not _is_int(self.num_levels, 2):
            return "num_levels", "an integer >= 2"
        if self.log_det not in LOG_DETS:
            return "log_det", f"one of {LOG_DETS}"
        if not _is_int(self.num_exact_terms, 0):
            return "num_exact_terms", "an integer >= 0"
        if self.term_distribution not in TERM_DISTRIBUTIONS:
            return "term_distribution", f"one of {TERM_DISTRIBUTIONS}"
        if not (_is_number(self.poisson_rate) and self.poisson_rate > 0):
            return "poisson_rate", "a number > 0"
        if not (_is_number(self.geometric_p) and 0 < self.geometric_p < 1):
            return "geometric_p", "a number in (0, 1)"
        if self.probe not in PROBES:
            return "probe", f"one of {PROBES}"
        if self.initial_power_iterations is not None and not _is_int(
            self.initial_power_iterations, 0
        ):
            return "initial_power_iterations", "None or an integer >= 0"
        return None

    def log_det_options(self) -> dict[str, Any]:
        """Options of every block's training estimator (`ResidualBlock(log_det_options=...)`)."""
        if self.log_det == "exact":
            return {}
        return {
            "distribution": self.term_distribution,
            "rate": float(self.poisson_rate),
            "p": float(self.geometric_p),
            "num_exact_terms": self.num_exact_terms,
            "probe": self.probe,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ImageFlowConfig":
        """Inverse of `to_dict`; unknown keys raise a `TypeError`."""
        return cls(**fields)


_PAPER = ImageFlowConfig(
    blocks_per_scale=(16, 16, 16),
    hidden_channels=512,
    kernel_sizes=(3, 1, 3),
    lipschitz_constant=0.98,
    activation="lipswish",
    learnable_norm_orders=False,
    actnorm=True,
    factor_out=False,
    squeeze_first=False,
    fc_end_blocks=4,
    fc_hidden_units=(128, 128),
    logit_alpha=0.05,
    num_levels=256,
    log_det="unbiased",
    num_exact_terms=2,
    term_distribution="poisson",
    poisson_rate=2.0,
    probe="gaussian",
    initial_power_iterations=10,
)


def _paper(**changes: object) -> ImageFlowConfig:
    fields = {**_PAPER.to_dict(), **changes}
    return ImageFlowConfig.from_dict(fields)


PRESETS: dict[str, ImageFlowConfig] = {
    "mnist": _paper(logit_alpha=1e-6),
    "cifar10": _paper(),
    "imagenet32": _paper(blocks_per_scale=(32, 32, 32)),
    "imagenet64": _paper(blocks_per_scale=(32, 32, 32), factor_out=True, squeeze_first=True),
    "celebahq256": _paper(
        blocks_per_scale=(16,) * 6,
        activation="elu",
        factor_out=True,
        squeeze_first=True,
        fc_end_blocks=0,
        num_levels=32,
        num_exact_terms=8,
    ),
    # 8x8 digits: 2 scales (8x8x1, then 4x4x4) of 4 blocks, 32 hidden channels, 2 fully
    # connected blocks of width 64 over the 64 dimensions; alpha 0.05 keeps the logit of the
    # many blank pixels near -3 instead of -14. Converged Lipschitz estimates at build (cheap).
    "digits": _paper(
        blocks_per_scale=(4, 4),
        hidden_channels=32,
        fc_end_blocks=2,
        fc_hidden_units=(64, 64),
        num_levels=17,
        initial_power_iterations=None,
    ),
}

PRESET_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "imagenet32": (32, 32, 3),
    "imagenet64": (64, 64, 3),
    "celebahq256": (256, 256, 3),
    "digits": (8, 8, 1),
}


def get_preset(name: str) -> ImageFlowConfig:
    """The `ImageFlowConfig` of a preset.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
