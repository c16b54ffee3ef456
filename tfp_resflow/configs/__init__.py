"""Frozen dataclass configs of blocks and flows, checked against the parts they name.

- `flow_configs`: `BlockConfig`, `ResidualFlowConfig`, `ImageFlowConfig`, each validated.
- `config_fields`: configs by field name: `with_fields`, `name=value` parsing, dicts.
- `presets`: the named configs (the paper's image models, i-DenseNet, the toy flow).

Configs sit above estimators, layers and solvers because they check names against their
registries, and below the bijectors they configure.
"""
