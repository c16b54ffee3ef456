"""Residual Flows (Chen et al., 2019) as TensorFlow Probability bijectors trained with Keras.

The package is flat; each module is about one idea:

- `logdet`: estimators of `log|det(I + J_g(x))|` and their registry.
- `series`: the Hutchinson power series behind them and its memory-lean Neumann gradient.
- `stateless_random`: seeded random numbers that agree in eager, graph and XLA modes.
- `operator_norm`: induced norms `||A||_{p->q}`: closed forms and the generalized power method.
- `lipschitz`: Keras layers whose operator norm is at most `c < 1` (`SpectralDense`; the
  convolution in `spectral_conv`, their shared base in `spectral_layer`).
- `gram_iteration`: guaranteed upper bounds on spectral norms (dense kernels, convolutions).
- `certification`: `certify`, guaranteed bounds on every block's `Lip(g)` (invertibility).
- `norm_order`: learnable orders of the mixed norms those layers can bound.
- `activation`: 1-Lipschitz activations (LipSwish and others).
- `network`: builders of residual functions `g` with `Lip(g) < 1`.
- `dense_network`: the same for densely connected `g` (i-DenseNet, learnable concatenation).
- `fixed_point`: fixed-point solvers (plain iteration, Anderson acceleration), by name.
- `solver`: the residual inverse and its implicit gradient.
- `validation`: the argument checks, one wording for every message.
- `config`: `BlockConfig`, `ResidualFlowConfig`, `ImageFlowConfig`; `name=value` parsing.
- `modes`: `training_mode` (which estimator) and `data_dependent_init`, per call.
- `fresh_bijector`: the base class of the package's bijectors and its graph-only cache.
- `block_functions`: a block's passes as traced functions shared by blocks of one kind.
- `bijector`: `ResidualBlock`, one invertible block as a TFP bijector.
- `actnorm`: ActNorm with data-dependent initialisation.
- `context`: the context c of conditional flows p(x | c): its checks and its routing to bijectors.
- `joint_pass`: the joint inverse-and-log-det of any bijector (one pass where possible).
- `composite`: stacks of bijectors walked in one pass (and the features a classifier reads).
- `flow`: `ResidualFlowBijector`, a stack of blocks for vector events.
- `model`: `FlowModel`, the Keras model that trains any of them with `fit`.
- `base_distribution`: the default base, a standard normal over a flow's latent.
- `hybrid`: `HybridFlowModel`, one flow that models p(x) and classifies (a head on its features).
- `optimizer`: `GroupedAdam`, Keras' Adam updating equal-shaped variables together.
- `bits`: bits per dimension of dequantised data.
- `image`, `multiscale`, `presets`: image bijectors, the multi-scale flow, the named configs.
- `conditional_data`: conditional densities with exact answers (rotated toys, two moons).
- `data`, `toy_data`, `training`, `evaluation`, `distribute`, `artifacts`: what `train_tf.py`
  is built from.
"""

from tfp_resflow.activation import CLipSwish, LipSwish, get_activation
from tfp_resflow.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijector import ResidualBlock, data_dependent_init, training_mode
from tfp_resflow.bits import bits_per_dim
from tfp_resflow.certification import CertificationWarning, certify
from tfp_resflow.config import BlockConfig, ImageFlowConfig, ResidualFlowConfig
from tfp_resflow.context import conditional_kwargs
from tfp_resflow.dense_network import LipschitzDenseLayer, dense_cnn, dense_mlp
from tfp_resflow.flow import ResidualFlowBijector
from tfp_resflow.hybrid import ClassificationHead, HybridFlowModel
from tfp_resflow.image import LogitTransform, Squeeze
from tfp_resflow.joint_pass import inverse_and_log_det
from tfp_resflow.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    norm_order_loss,
    update_lipschitz,
)
from tfp_resflow.logdet import (
    LogDetFn,
    exact_log_det,
    power_series_log_det,
    russian_roulette_log_det,
)
from tfp_resflow.model import FlowModel
from tfp_resflow.multiscale import MultiscaleResidualFlow, image_flow
from tfp_resflow.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.norm_order import NormOrder
from tfp_resflow.optimizer import GroupedAdam
from tfp_resflow.presets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActNorm",
    "ActNormLayer",
    "BlockConfig",
    "CLipSwish",
    "CertificationWarning",
    "ClassificationHead",
    "FlowModel",
    "GroupedAdam",
    "HybridFlowModel",
    "ImageFlowConfig",
    "LipSwish",
    "LipschitzDenseLayer",
    "LogDetFn",
    "LogitTransform",
    "MultiscaleResidualFlow",
    "NormOrder",
    "ResidualBlock",
    "ResidualFlowBijector",
    "ResidualFlowConfig",
    "SpectralConv2D",
    "SpectralDense",
    "Squeeze",
    "bits_per_dim",
    "certify",
    "conditional_kwargs",
    "data_dependent_init",
    "dense_cnn",
    "dense_mlp",
    "exact_log_det",
    "get_activation",
    "image_flow",
    "inverse_and_log_det",
    "lipschitz_cnn",
    "lipschitz_mlp",
    "norm_order_loss",
    "power_series_log_det",
    "russian_roulette_log_det",
    "training_mode",
    "update_lipschitz",
]
