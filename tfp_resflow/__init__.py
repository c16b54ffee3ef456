"""Residual Flows (Chen et al., 2019) as TensorFlow Probability bijectors trained with Keras.

The subpackages are layers; each imports only from those below it (docs/design.md):

- `training`: `TrainConfig`, `GroupedAdam`, evaluation, `tf.distribute` loops (train_tf.py).
- `models`: `FlowModel`, `HybridFlowModel`: Keras models that train a flow with `fit`.
- `bijectors`: `ResidualBlock`, `ActNorm`, `Squeeze`, `ResidualFlowBijector`,
  `MultiscaleResidualFlow`, the one-pass density walk; `certify`.
- `configs`: `BlockConfig`, `ResidualFlowConfig`, `ImageFlowConfig`, `PRESETS`.
- `estimators`, `layers`, `solvers`, `data`: the log-det estimators, the Lipschitz layers and
  residual functions, the fixed-point solvers, the data sets; each independent of the others.
- `core`: argument checks, seeded random numbers, modes, the context of conditional flows.

The names below are the public API; everything else is reachable by its subpackage path.
"""

from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijectors.certification import CertificationWarning, certify
from tfp_resflow.bijectors.flow import ResidualFlowBijector
from tfp_resflow.bijectors.image import LogitTransform, Squeeze
from tfp_resflow.bijectors.joint_pass import inverse_and_log_det
from tfp_resflow.bijectors.multiscale import MultiscaleResidualFlow, image_flow
from tfp_resflow.bijectors.residual_block import ResidualBlock, data_dependent_init, training_mode
from tfp_resflow.configs.flow_configs import BlockConfig, ImageFlowConfig, ResidualFlowConfig
from tfp_resflow.configs.presets import PRESETS
from tfp_resflow.core import moved_modules
from tfp_resflow.core.context import conditional_kwargs
from tfp_resflow.estimators.logdet import (
    LogDetFn,
    exact_log_det,
    power_series_log_det,
    russian_roulette_log_det,
)
from tfp_resflow.layers.activation import CLipSwish, LipSwish, get_activation
from tfp_resflow.layers.dense_network import LipschitzDenseLayer, dense_cnn, dense_mlp
from tfp_resflow.layers.lipschitz import (
    SpectralConv2D,
    SpectralDense,
    norm_order_loss,
    update_lipschitz,
)
from tfp_resflow.layers.network import lipschitz_cnn, lipschitz_mlp
from tfp_resflow.layers.norm_order import NormOrder
from tfp_resflow.models.bits import bits_per_dim
from tfp_resflow.models.hybrid import ClassificationHead, HybridFlowModel
from tfp_resflow.models.model import FlowModel
from tfp_resflow.training.optimizer import GroupedAdam

__version__ = "0.1.0"

# The module paths of 0.1.0 (`tfp_resflow.logdet`, ...) still import, with a DeprecationWarning.
moved_modules.install()

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
