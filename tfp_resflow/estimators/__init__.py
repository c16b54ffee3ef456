"""Estimators of `log|det(I + J_g(x))|` and their gradients.

- `series`: the Hutchinson power series and its memory-lean Neumann gradient.
- `roulette`: the Russian-roulette number of terms and its weights (the unbiased estimator).
- `logdet`: the estimators (exact, truncated, unbiased) and their registry.
"""
