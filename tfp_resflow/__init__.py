"""Residual Flows (Chen et al., 2019) as TensorFlow Probability bijectors trained with Keras.

The package is flat; each module is about one idea:

- `logdet`: estimators of `log|det(I + J_g(x))|` and their memory-lean gradients.
- `stateless_random`: seeded random numbers that agree in eager, graph and XLA modes.
- `lipschitz`: Keras layers whose operator norm is at most `c < 1`.
- `activation`: 1-Lipschitz activations (LipSwish and others).
- `network`: builders of residual functions `g` with `Lip(g) < 1`.
- `bijector`: `ResidualBlock`, one invertible block as a TFP bijector.
- `actnorm`: ActNorm with data-dependent initialisation.
- `flow`: `ResidualFlowBijector`, a stack of blocks for vector events.
- `model`: `FlowModel`, the Keras model that trains any of them with `fit`.
"""

from tfp_resflow.activation import CLipSwish, LipSwish, get_activation
from tfp_resflow.actnorm import ActNorm, ActNormLayer
from tfp_resflow.bijector import ResidualBlock, data_dependent_init, training_mode
from tfp_resflow.flow import ResidualFlowBijector
from tfp_resflow.lipschitz import SpectralConv2D, SpectralDense, update_lipschitz
from tfp_resflow.logdet import (
    LogDetFn,
    exact_log_det,
    power_series_log_det,
    russian_roulette_log_det,
)
from tfp_resflow.model import FlowModel
from tfp_resflow.network import lipschitz_cnn, lipschitz_mlp

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "ActNormLayer",
    "CLipSwish",
    "FlowModel",
    "LipSwish",
    "LogDetFn",
    "ResidualBlock",
    "ResidualFlowBijector",
    "SpectralConv2D",
    "SpectralDense",
    "data_dependent_init",
    "exact_log_det",
    "get_activation",
    "lipschitz_cnn",
    "lipschitz_mlp",
    "power_series_log_det",
    "russian_roulette_log_det",
    "training_mode",
    "update_lipschitz",
]
