"""Tests of `moved_modules`: the module paths of release 0.1.0 still import, with a warning."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tfp_resflow
from tfp_resflow.core.moved_modules import MOVED, RENAMED

PACKAGE = Path(tfp_resflow.__file__).resolve().parent
NEW_SINCE_0_1_0 = {"core.moved_modules"}


def current_modules() -> set[str]:
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.glob("*/*.py")
        if p.stem != "__init__"
    }


def test_every_module_of_0_1_0_has_a_new_path_and_every_module_an_old_one():
    targets = set(MOVED.values()) | set(RENAMED.values())
    assert len(targets) == len(MOVED) + len(RENAMED)  # no two old modules map to one
    assert targets == current_modules() - NEW_SINCE_0_1_0


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_gives_the_moved_module_and_warns(old):
    sys.modules.pop(f"tfp_resflow.{old}", None)
    with pytest.warns(DeprecationWarning, match=rf"tfp_resflow\.{old} moved to tfp_resflow\."):
        module = importlib.import_module(f"tfp_resflow.{old}")
    new = importlib.import_module(f"tfp_resflow.{MOVED[old]}")
    assert module is new
    assert module.__spec__.name == f"tfp_resflow.{MOVED[old]}"  # its own spec, not the alias's


def test_from_imports_of_old_paths_give_the_same_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tfp_resflow.config import BlockConfig

        from tfp_resflow.data import load_dataset, toy_samples
        from tfp_resflow.training import TrainConfig, make_optimizer
    from tfp_resflow.data import datasets
    from tfp_resflow.training import train_config

    assert BlockConfig is tfp_resflow.BlockConfig
    assert (load_dataset, toy_samples) == (datasets.load_dataset, datasets.toy_samples)
    assert (TrainConfig, make_optimizer) == (train_config.TrainConfig, train_config.make_optimizer)


@pytest.mark.parametrize("package", sorted(RENAMED))
def test_a_renamed_module_s_attribute_warns_and_unknown_names_fail(package):
    module = importlib.import_module(f"tfp_resflow.{package}")
    name = {"data": "load_dataset", "training": "TrainConfig"}[package]
    with pytest.warns(DeprecationWarning, match=rf"{package}\.{name} moved to"):
        getattr(module, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


def test_new_paths_and_unrelated_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.import_module("tfp_resflow.estimators.logdet")
        from tfp_resflow.data import datasets  # noqa: F401
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tfp_resflow.no_such_module")


def test_importing_submodules_of_the_renamed_subpackages_does_not_warn():
    # In a fresh process: the package's __getattr__ is asked before the submodules exist.
    code = (
        "from tfp_resflow.training import distribute, evaluation, optimizer\n"
        "from tfp_resflow.data import tfds_images, toy_data\n"
    )
    subprocess.run(
        [sys.executable, "-W", "error:tfp_resflow.:DeprecationWarning", "-c", code],
        check=True,
        capture_output=True,
    )
