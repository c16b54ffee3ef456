"""`ImageFlowConfig` and the named image-flow configurations (Chen et al. 2019, and digits).

    flow = multiscale.image_flow((28, 28, 1), "mnist")   # a MultiscaleResidualFlow
    model = FlowModel(flow, (28, 28, 1), loss_unit="bits_per_dim", num_levels=256)

`PRESETS[name]` is a `config.ImageFlowConfig`, `PRESET_INPUT_SHAPES[name]` its image shape;
`TOY` is the `config.ResidualFlowConfig` that `train_tf.py` uses for 2-D data.

The paper presets reproduce the authors' `train_img.py` commands (README of
rtqichen/residual-flows): LipSwish (ELU for CelebA-HQ), coefficient 0.98, hidden width 512 with
kernels 3-1-3, ActNorm after every block, 4 fully connected end blocks of width 128 (two hidden
layers), and the unbiased estimator with Poisson(2) extra terms after 2 exact ones (8 for
CelebA-HQ) and Gaussian probes, as the authors draw them. Their 8-bit data have 256 levels;
CelebA-HQ is reduced to 5 bits (32 levels). The logit's alpha is 1e-6 for MNIST, 0.05 else.

They build with 10 power iterations per Lipschitz layer instead of converging (the authors'
tolerance 1e-3 stops after about 8), so that the 16-100 M parameter models build in seconds to
minutes on a CPU; training refines the estimates after every step.

`idensenet_mnist` and `idensenet_cifar10` are the i-DenseNets of Perugachi-Diaz, Tomczak, Bhulai
(2021), https://arxiv.org/abs/2102.02694: the same flows with `network="dense"`, as their
README's CIFAR-10 command (yperugachidiaz/invertible_densenets) over their `train_img.py`
defaults: every `g` a dense block of depth 3 (3x3 convolutions, then a 1x1 one), CLipSwish,
learnable concatenation; the fully connected end blocks project to 64 features, then 3 dense
layers of growth 32. The growth is 172 for CIFAR-10 (the README command; 24.9M parameters
published); the README gives no MNIST command and no MNIST count was available to us, so
MNIST's growth, 152, is derived from the paper's equal parameter budget with Residual Flow
(16.6M on MNIST). The counts and sources are next to the presets; `tests/configs/test_presets.py`
derives them. The authors hold the concatenation weights at their start for 25 epochs
(`--start_learnable_concat`); here they train from the first step.

`digits` is not from the paper: a model for the 8x8 scikit-learn digits (17 levels) that
trains in a few minutes on 2 CPU cores.
"""

from tfp_resflow.configs.config_fields import with_fields
from tfp_resflow.configs.flow_configs import BlockConfig, ImageFlowConfig, ResidualFlowConfig

__all__ = ["PRESETS", "PRESET_INPUT_SHAPES", "TOY", "ImageFlowConfig", "get_preset"]

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
    initial_power_iterations=10,
    block=BlockConfig(
        log_det="unbiased",
        num_exact_terms=2,
        term_distribution="poisson",
        poisson_rate=2.0,
        probe="gaussian",
        # Not the paper's: the fixed-point iteration compiled with XLA, which samples the
        # `mnist` preset in 14.5 s against 20.2 s uncompiled (64 images; the authors' code
        # 37.6 s; docs/guides/solvers.md).
        solver_jit_compile=True,
        # Not the paper's either: the Neumann backward in slices of at most 16 examples. Same
        # gradients; the `mnist` preset's peak at batch 64 fell from 4.62 to 2.91 GB at the same
        # step time (one TF thread; docs/results/speed-and-memory.md).
        backward_slice_size=16,
    ),
)


def _paper(**changes: object) -> ImageFlowConfig:
    return with_fields(_PAPER, **changes)


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
    # ELU, not LipSwish: ahead beyond the spread at equal steps and faster per step on these
    # budgets (docs/results/quality-per-step.md, "Defaults follow the evidence").
    "digits": _paper(
        activation="elu",
        blocks_per_scale=(4, 4),
        hidden_channels=32,
        fc_end_blocks=2,
        fc_hidden_units=(64, 64),
        num_levels=17,
        initial_power_iterations=None,
        backward_slice_size=None,  # 0.5 MB per activation at batch 64: nothing to save
    ),
}

# i-DenseNet (Perugachi-Diaz et al. 2021, arXiv 2102.02694). Counts are trainable parameters;
# the authors' PyTorch count adds 104 gradient-less scalars (2 per block, as for `mnist` above).
_IDENSENET = with_fields(
    _PAPER,
    network="dense",
    learnable_concatenation=True,
    activation="clipswish",
    hidden_channels=172,  # the dense growth
    kernel_sizes=(3, 3, 3, 1),  # depth 3, then the 1x1 convolution back to the block's channels
    fc_hidden_units=(64, 32, 32, 32),  # projection to 64, then 3 dense layers of growth 32
)
# MNIST: DERIVED, not published. The README has no MNIST command, and no MNIST count of the
# paper could be read here; the paper compares with Residual Flow "where we utilize an equal
# parameter budget" (abstract), and Residual Flow's MNIST model has 16.6M (16,608,589 here).
# Depth 3 (the authors' depth for all their full-size models) with growth 152 (even, as
# CLipSwish needs; the even growth nearest the budget) gives 16,561,622 parameters, 0.28% under
# it; the CIFAR-10 growth 172 would give 20,872,982 (+26%), since dense blocks on 1-16 channels
# cost more than 3-1-3 residual ones. 28x28 images, logit alpha 1e-6: Residual Flow's MNIST.
PRESETS["idensenet_mnist"] = with_fields(_IDENSENET, hidden_channels=152, logit_alpha=1e-6)
# CIFAR-10: the README command of yperugachidiaz/invertible_densenets ("--nblocks 16-16-16
# --densenet_depth 3 --densenet_growth 172 --act CLipSwish --learnable_concat True").
# 24,894,586 parameters (24,894,690 with the authors' 104), within 0.03% of the published 24.9M
# (i-DenseNet's CIFAR-10 count as tabulated by later flow papers, e.g. CDFlow's Table 2, against
# Residual Flow's 25.2M; the same counting with 32-32-32 blocks on ImageNet32 gives their 47.0M).
PRESETS["idensenet_cifar10"] = _IDENSENET

# 2-D toy sets: 8 blocks (the authors' toy model is 100 blocks of 128, for hours) of CLipSwish g
# 2-45-45-2, the size (36,076 parameters) of LipSwish 2-64-64-2 (35,916): at equal size and
# steps CLipSwish was ahead of LipSwish beyond the spread on all three toy sets of the
# comparison (docs/results/quality-per-step.md, "Defaults follow the evidence").
TOY = ResidualFlowConfig(num_blocks=8, hidden_units=(45, 45), activation="clipswish")

PRESET_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "imagenet32": (32, 32, 3),
    "imagenet64": (64, 64, 3),
    "celebahq256": (256, 256, 3),
    "digits": (8, 8, 1),
    "idensenet_mnist": (28, 28, 1),
    "idensenet_cifar10": (32, 32, 3),
}


def get_preset(name: str) -> ImageFlowConfig:
    """The `ImageFlowConfig` of a preset.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
