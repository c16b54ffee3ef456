"""TFP bijectors: the residual block, the other steps of a flow, and the flows they stack into.

- `fresh_bijector`: the base class of the package's bijectors and its graph-only cache.
- `block_functions`: a block's passes as traced functions shared by blocks of one kind.
- `residual_block`: `ResidualBlock`, one invertible block `y = x + g(x)`.
- `actnorm`: ActNorm with data-dependent initialisation.
- `image`: `Squeeze`, `LogitTransform` and the shapes of a multi-scale flow.
- `joint_pass`, `density_pass`: the inverse and log-det of any bijector in one pass.
- `composite`: stacks of bijectors walked in one pass (and the features a classifier reads).
- `flow`: `ResidualFlowBijector`, a stack of blocks for vector events.
- `multiscale`: `MultiscaleResidualFlow` and `image_flow`, the paper's image architecture.
- `certification`: `certify`, guaranteed bounds on every block's `Lip(g)`.
"""
