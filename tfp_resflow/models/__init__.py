"""Keras models that train a flow with `fit`.

- `base_distribution`: the default base, a standard normal over a flow's latent.
- `bits`: bits per dimension of dequantised data.
- `model`: `FlowModel`, the density model of any of the package's flows (or a TFP chain).
- `hybrid`: `HybridFlowModel`, one flow that models p(x) and classifies.
"""
