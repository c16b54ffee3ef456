"""The module paths of release 0.1.0, before the modules moved into subpackages.

`import tfp_resflow.logdet` (or `from tfp_resflow.config import BlockConfig`) still works: the
finder below answers for the old name with the module at its new path, the same module object,
so its classes and registered Keras names are the ones the rest of the package uses. Each old
path warns once with the new one (`DeprecationWarning`); they go in the release after next.
`tfp_resflow.data` and `tfp_resflow.training` are subpackages now; their old attributes
(`tfp_resflow.data.load_dataset`) are answered by `moved_attribute` from the modules that hold
them. The package installs the finder when it is imported; nothing here imports the package.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

# old module (under tfp_resflow) -> its path now
MOVED = {
    "activation": "layers.activation",
    "actnorm": "bijectors.actnorm",
    "anderson": "solvers.anderson",
    "artifacts": "training.artifacts",
    "base_distribution": "models.base_distribution",
    "bijector": "bijectors.residual_block",
    "bits": "models.bits",
    "block_functions": "bijectors.block_functions",
    "certification": "bijectors.certification",
    "composite": "bijectors.composite",
    "conditional_data": "data.conditional_data",
    "config": "configs.flow_configs",
    "config_fields": "configs.config_fields",
    "context": "core.context",
    "dense_network": "layers.dense_network",
    "density_pass": "bijectors.density_pass",
    "dequantization": "data.dequantization",
    "distribute": "training.distribute",
    "evaluation": "training.evaluation",
    "evaluation_callback": "training.evaluation_callback",
    "fixed_point": "solvers.fixed_point",
    "flow": "bijectors.flow",
    "fresh_bijector": "bijectors.fresh_bijector",
    "gram_iteration": "layers.gram_iteration",
    "graph_writes": "core.graph_writes",
    "hybrid": "models.hybrid",
    "image": "bijectors.image",
    "joint_pass": "bijectors.joint_pass",
    "lipschitz": "layers.lipschitz",
    "logdet": "estimators.logdet",
    "model": "models.model",
    "modes": "core.modes",
    "multiscale": "bijectors.multiscale",
    "network": "layers.network",
    "norm_order": "layers.norm_order",
    "operator_norm": "layers.operator_norm",
    "optimizer": "training.optimizer",
    "presets": "configs.presets",
    "roulette": "estimators.roulette",
    "series": "estimators.series",
    "solver": "solvers.solver",
    "spectral_conv": "layers.spectral_conv",
    "spectral_layer": "layers.spectral_layer",
    "stateless_random": "core.stateless_random",
    "tfds_images": "data.tfds_images",
    "toy_data": "data.toy_data",
    "validation": "core.validation",
}
# Old modules whose name is a subpackage now: their attributes come from these modules.
RENAMED = {"data": "data.datasets", "training": "training.train_config"}


def _warn(old: str, new: str, *, stacklevel: int) -> None:
    warnings.warn(
        f"tfp_resflow.{old} moved to tfp_resflow.{new}; the old path goes in a later release.",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(self.old, self.new, stacklevel=2)  # the import machinery's frames are hidden
        module = importlib.import_module(f"tfp_resflow.{self.new}")
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module at the new path has run already; the import machinery set its `__spec__`
        # to the alias's, so give it back its own (reload, pickling and tools read it).
        module.__spec__ = self.spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `tfp_resflow.<old>` for the modules in `MOVED`."""

    def find_spec(
        self, fullname: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The alias's spec for a moved module's old name; None for every other name."""
        package, _, old = fullname.rpartition(".")
        if package != "tfp_resflow" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(old, MOVED[old]))


def install() -> None:
    """Puts the finder on `sys.meta_path` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def moved_attribute(package: str, name: str) -> object:
    """`tfp_resflow.data.load_dataset` and the like: the attribute of the old module."""
    new = RENAMED[package]
    module = importlib.import_module(f"tfp_resflow.{new}")
    # `from tfp_resflow.training import distribute` asks here first when the submodule is not
    # imported yet; the import above brings it in, as an attribute of the package: no warning.
    if name in vars(subpackage := sys.modules[f"tfp_resflow.{package}"]):
        return vars(subpackage)[name]
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module 'tfp_resflow.{package}' has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{new}.{name}", stacklevel=3)  # past the package's __getattr__
    return getattr(module, name)
