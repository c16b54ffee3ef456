"""Tests of the model configs (`flow_configs`): how a block picks its estimators."""

import subprocess
import sys

import pytest

from tfp_resflow.configs.config_fields import parse_assignments
from tfp_resflow.configs.flow_configs import BlockConfig, ImageFlowConfig, ResidualFlowConfig
from tfp_resflow.estimators import logdet


@pytest.mark.parametrize(
    ("config", "event_size", "name", "options"),
    [
        (BlockConfig(), logdet.EVAL_EXACT_MAX_EVENT_SIZE, "exact_log_det", {}),
        (
            BlockConfig(),
            logdet.EVAL_EXACT_MAX_EVENT_SIZE + 1,
            "russian_roulette_log_det",
            {"num_exact_terms": 20, "neumann_gradient": False, "term_distribution": "geometric"},
        ),
        (
            BlockConfig(eval_num_exact_terms=5, term_distribution="poisson"),
            100,
            "russian_roulette_log_det",
            {"num_exact_terms": 5, "term_distribution": "poisson"},
        ),
        (BlockConfig(eval_log_det="exact"), 100, "exact_log_det", {}),
        (
            BlockConfig(eval_log_det="truncated", num_terms=3),
            2,
            "power_series_log_det",
            {"num_terms": 3},
        ),
    ],
)
def test_evaluation_picks_its_estimator_from_the_registry(config, event_size, name, options):
    estimator = config.estimator(training=False, event_size=event_size)
    function = getattr(estimator, "func", estimator)
    assert function.__name__ == name
    bound = getattr(estimator, "keywords", {})
    for key, value in options.items():
        assert bound[key] == value


def test_training_estimator_takes_exactly_its_registered_options():
    config = BlockConfig(log_det="truncated", num_terms=4, probe="gaussian")
    estimator = config.estimator(training=True, event_size=2)
    assert estimator.func is logdet.power_series_log_det
    assert set(estimator.keywords) == set(logdet.ESTIMATORS["truncated"].options)
    assert estimator.keywords["num_terms"] == 4


# -- network: the kind of g ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ResidualFlowConfig, ImageFlowConfig])
def test_unknown_network_names_the_field(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.network must be one of \('resnet'"):
        cls(network="densenet")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ResidualFlowConfig(network="dense", learnable_concatenation=1),
            r"ResidualFlowConfig\.learnable_concatenation must be a bool",
        ),
        (
            lambda: ResidualFlowConfig(
                network="dense", hidden_units=(8, 5), activation="clipswish"
            ),
            r"ResidualFlowConfig\.hidden_units must be growths divisible by 2 with clipswish",
        ),
        (
            lambda: ResidualFlowConfig(network="dense", hidden_units=()),
            r"ResidualFlowConfig\.hidden_units must be non-empty with network='dense'",
        ),
        (
            lambda: ResidualFlowConfig(network="dense", norm_orders=(2, 1, 2)),
            r"ResidualFlowConfig\.norm_orders must be None with network='dense'",
        ),
        (
            lambda: ResidualFlowConfig(network="dense", learnable_norm_orders=True),
            r"ResidualFlowConfig\.learnable_norm_orders must be False with network='dense'",
        ),
        (
            lambda: ImageFlowConfig(network="dense", hidden_channels=7, activation="clipswish"),
            r"ImageFlowConfig\.hidden_channels must be growths divisible by 2",
        ),
        (
            lambda: ImageFlowConfig(network="dense", kernel_sizes=(3,)),
            r"ImageFlowConfig\.kernel_sizes must be at least 2 sizes with network='dense'",
        ),
        (
            lambda: ImageFlowConfig(network="dense", fc_hidden_units=()),
            r"ImageFlowConfig\.fc_hidden_units must be non-empty with network='dense'",
        ),
        (
            lambda: ImageFlowConfig(
                network="dense", activation="clipswish", fc_hidden_units=(64, 31)
            ),
            r"ImageFlowConfig\.fc_hidden_units must be growths divisible by 2",
        ),
    ],
)
def test_dense_settings_are_checked_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_network_is_read_from_the_command_line():
    config = parse_assignments(
        ResidualFlowConfig(), ["network=dense", "hidden_units=4,4", "learnable_concatenation=false"]
    )
    assert (config.network, config.hidden_units, config.learnable_concatenation) == (
        "dense",
        (4, 4),
        False,
    )
    assert ImageFlowConfig().network == ResidualFlowConfig().network == "resnet"
    # The image defaults make a valid dense config: a projection to 128, one layer of growth 128.
    assert ImageFlowConfig(network="dense").fc_hidden_units == (128, 128)


def test_importing_the_package_and_its_presets_leaves_the_runtime_unstarted():
    """Configs are checked at import (the presets); that must not start TensorFlow's runtime,
    or `tf.distribute` could no longer split the CPU into logical devices (`--cpu-devices`)."""
    code = (
        "import tensorflow as tf\n"
        "import tfp_resflow, tfp_resflow.configs.presets, tfp_resflow.training.train_config\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "devices = [tf.config.LogicalDeviceConfiguration()] * 2\n"
        "tf.config.set_logical_device_configuration(cpu, devices)\n"
        "print(len(tf.config.list_logical_devices('CPU')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "2"


def test_lipschitz_estimate_is_checked():
    with pytest.raises(ValueError, match="lipschitz_estimate"):
        ResidualFlowConfig(lipschitz_estimate="exact")
    with pytest.raises(ValueError, match="lipschitz_estimate"):
        ImageFlowConfig(lipschitz_estimate="exact")
    with pytest.raises(ValueError, match="learnable_norm_orders"):
        ResidualFlowConfig(lipschitz_estimate="gram", learnable_norm_orders=True)
    with pytest.raises(ValueError, match="norm_orders"):
        ResidualFlowConfig(lipschitz_estimate="gram", hidden_units=(4,), norm_orders=(2, 3, 2))
