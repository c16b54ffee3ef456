"""Tests of the named image-flow presets: the authors' settings and parameter counts."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tfp_resflow.bijector import training_mode
from tfp_resflow.bits import bits_per_dim
from tfp_resflow.model import FlowModel
from tfp_resflow.multiscale import MultiscaleResidualFlow, image_flow, scale_shapes
from tfp_resflow.presets import PRESET_INPUT_SHAPES, PRESETS, get_preset

# The authors' README commands over train_img.py's defaults (reference §4.5): name ->
# (blocks per scale, activation, factor-out, squeeze-first, FC end blocks, logit alpha, levels,
# exact terms).
AUTHORS = {
    "mnist": ((16, 16, 16), "lipswish", False, False, 4, 1e-6, 256, 2),
    "cifar10": ((16, 16, 16), "lipswish", False, False, 4, 0.05, 256, 2),
    "imagenet32": ((32, 32, 32), "lipswish", False, False, 4, 0.05, 256, 2),
    "imagenet64": ((32, 32, 32), "lipswish", True, True, 4, 0.05, 256, 2),
    "celebahq256": ((16,) * 6, "elu", True, True, 0, 0.05, 32, 8),
}


@pytest.mark.parametrize("name", AUTHORS)
def test_paper_presets_have_the_authors_settings(name):
    c = get_preset(name)
    blocks, activation, factor_out, squeeze_first, fc_end, alpha, levels, exact = AUTHORS[name]
    assert c.blocks_per_scale == blocks
    assert (c.activation, c.factor_out, c.squeeze_first) == (activation, factor_out, squeeze_first)
    assert (c.fc_end_blocks, c.logit_alpha, c.num_levels) == (fc_end, alpha, levels)
    assert (c.hidden_channels, c.kernel_sizes, c.lipschitz_constant) == (512, (3, 1, 3), 0.98)
    assert (c.actnorm, c.fc_hidden_units) == (True, (128, 128))
    assert c.block.estimator_options(c.block.log_det) == {
        "term_distribution": "poisson",
        "poisson_rate": 2.0,
        "geometric_p": 0.5,  # unused with the Poisson distribution
        "num_exact_terms": exact,
        "probe": "gaussian",
        "num_probes": 1,
        "neumann_gradient": True,
    }


# The authors' shapes at each scale (reference §4.2 and §4.5), as (H, W, C).
SCALES = {
    "mnist": [(28, 28, 1), (14, 14, 4), (7, 7, 16)],
    "cifar10": [(32, 32, 3), (16, 16, 12), (8, 8, 48)],
    "imagenet64": [(32, 32, 12), (16, 16, 24), (8, 8, 48)],
    "celebahq256": [(128, 128, 12), (64, 64, 24), (32, 32, 48), (16, 16, 96), (8, 8, 192)]
    + [(4, 4, 384)],
    "digits": [(8, 8, 1), (4, 4, 4)],
}


@pytest.mark.parametrize("name", SCALES)
def test_preset_scales_match_the_authors_shapes(name):
    assert scale_shapes(PRESET_INPUT_SHAPES[name], PRESETS[name]) == SCALES[name]


def authors_parameter_count(input_shape, config):
    """Trainable parameters of the authors' model with this config, from its architecture.

    Per convolutional block on c channels (kernels k_1..k_n, hidden width m): each convolution
    has k*k*in*out weights + out biases; a LipSwish has one beta per instance, before every
    convolution except the network's first (ELU has none); the ActNorm after the block has 2c
    (bias, log-scale). The first scale starts with one ActNorm (2c). Per fully connected block
    on D = h*w*c of the last scale (widths 128, 128): linear layers D->128->128->D with biases,
    3 LipSwish, and an ActNorm over the D features (2D).
    """
    c = config
    beta = {"lipswish": 1, "elu": 0}[c.activation]  # learned slopes per activation instance
    total = 0
    for i, (shape, num_blocks) in enumerate(
        zip(scale_shapes(input_shape, c), c.blocks_per_scale, strict=True)
    ):
        channels = shape[-1]
        widths = [channels, *[c.hidden_channels] * (len(c.kernel_sizes) - 1), channels]
        convs = sum(
            k * k * a * b + b
            for k, a, b in zip(c.kernel_sizes, widths[:-1], widths[1:], strict=True)
        )
        activations = len(c.kernel_sizes) * num_blocks - (1 if i == 0 else 0)
        activations *= beta
        total += num_blocks * (convs + 2 * channels) + activations
        if i == 0:
            total += 2 * channels
    size = math.prod(scale_shapes(input_shape, c)[-1])  # the last scale's h*w*c
    widths = [size, *c.fc_hidden_units, size]
    dense = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    total += c.fc_end_blocks * (dense + beta * (len(widths) - 1) + 2 * size)
    return total


# mnist: 3 scales of 16 blocks on 1, 4, 16 channels: convolutions 9217 c + 263168 per block,
# i.e. 272385, 300036, 410640, times 16 = 15,728,976; LipSwish 47 + 48 + 48 = 143; ActNorms
# 2 + 32 + 128 + 512 = 674; 4 FC blocks on 784 features: 218,128 + 3 + 1,568 each = 878,796.
# Total 16,608,589. The authors' count, 16,608,693 (shared/reference/targets.md), is 104 more:
# each of their 52 blocks holds 2 gradient-less scalars (the roulette's geometric p and Poisson
# rate as nn.Parameters), which this package keeps as plain settings.
# cifar10: 3, 12, 48 channels, FC on 3072 features: 25,174,129 (+104 = 25,174,233 theirs).
# digits (not the authors'): 45,531.
COUNTS = {"mnist": 16_608_589, "cifar10": 25_174_129, "digits": 45_531}
AUTHORS_GRADIENT_LESS_SCALARS = 2 * (48 + 4)


@pytest.mark.parametrize("name", COUNTS)
def test_paper_presets_build_with_the_authors_parameter_count(name):
    shape, config = PRESET_INPUT_SHAPES[name], PRESETS[name]
    assert authors_parameter_count(shape, config) == COUNTS[name]
    # No power iterations at build: the count does not depend on them, and they cost seconds.
    flow = image_flow(shape, dataclasses.replace(config, initial_power_iterations=0))
    count = sum(math.prod(w.shape) for layer in flow.keras_layers for w in layer.trainable_weights)
    assert count == COUNTS[name]
    if name == "mnist":
        assert len(flow.blocks) == 52
        assert count + AUTHORS_GRADIENT_LESS_SCALARS == 16_608_693


def test_digits_preset_gives_finite_bits_per_dim_on_dequantised_digits():
    # The call train_tf.py makes: image_flow((8, 8, 1), "digits") with 17 levels.
    flow = image_flow((8, 8, 1), "digits")
    assert isinstance(flow, MultiscaleResidualFlow)
    assert flow.config.num_levels == 17
    model = FlowModel(flow, (8, 8, 1), loss_unit="bits_per_dim", num_levels=17)
    digits = load_digits().images[:64, :, :, None]  # integers 0..16
    x = ((digits + np.random.default_rng(0).uniform(size=digits.shape)) / 17).astype(np.float32)
    bpd = model(x, training=False).numpy()
    assert bpd.shape == (64,)
    assert np.all(np.isfinite(bpd))
    # The model's unit is the shared helper applied to the density.
    with training_mode(False):
        log_p = model.distribution.log_prob(x, bijector_kwargs={"seed": [1, 2]})
        again = model.distribution.log_prob(x, bijector_kwargs={"seed": [1, 2]})
    np.testing.assert_allclose(log_p, again, rtol=1e-6)
    assert float(tf.reduce_mean(bits_per_dim(log_p, 64, 17))) > 0


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"Unknown preset 'cifar'; choose one of \['celebahq256'"):
        image_flow((32, 32, 3), "cifar")


def test_preset_on_a_size_the_squeezes_do_not_divide_names_the_shape():
    with pytest.raises(ValueError, match=r"Images of shape \(30, 30, 3\) cannot be squeezed 3"):
        image_flow((30, 30, 3), "imagenet64")
