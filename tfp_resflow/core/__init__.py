"""What every layer of the package uses; imports nothing else from the package.

- `validation`: the argument checks, one wording for every message.
- `stateless_random`: seeded random numbers that agree in eager, graph and XLA modes.
- `graph_writes`: how many variable writes a graph under construction holds (for the cache).
- `modes`: `training_mode` (which estimator) and `data_dependent_init`, per call.
- `context`: the context c of conditional flows p(x | c): its checks and its routing.
- `moved_modules`: the module paths of release 0.1.0, still importable (deprecated).
"""
