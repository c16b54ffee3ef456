"""Residual Flows (Chen et al., 2019) as TensorFlow Probability bijectors.

The package is flat; each module is about one idea:

- `logdet`: estimators of `log|det(I + J_g(x))|` and their memory-lean gradients.
- `stateless_random`: seeded random numbers that agree in eager, graph and XLA modes.
"""

from tfp_resflow.logdet import (
    LogDetFn,
    exact_log_det,
    power_series_log_det,
    russian_roulette_log_det,
)

__version__ = "0.1.0"

__all__ = [
    "LogDetFn",
    "exact_log_det",
    "power_series_log_det",
    "russian_roulette_log_det",
]
