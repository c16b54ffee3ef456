"""Tests of configs by field name (`tfp_resflow.configs.config_fields`): routing, parsing, dicts."""

import json
import re

import pytest

from tfp_resflow.configs.config_fields import parse_assignments, to_dict, with_fields
from tfp_resflow.configs.flow_configs import BlockConfig, ImageFlowConfig, ResidualFlowConfig
from tfp_resflow.estimators import logdet

CONFIGS = [BlockConfig(), ResidualFlowConfig(), ImageFlowConfig()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_json(config):
    fields = json.loads(json.dumps(to_dict(config)))
    assert type(config)(**fields) == config


def test_norm_orders_with_infinity_round_trip_through_json():
    config = ResidualFlowConfig(hidden_units=(4,), norm_orders=(2.0, float("inf"), 2.0))
    fields = json.loads(json.dumps(to_dict(config)))
    assert fields["norm_orders"] == [2.0, "inf", 2.0]
    assert ResidualFlowConfig(**fields).norm_orders == (2.0, "inf", 2.0)


def test_a_callable_estimator_is_accepted_but_not_serialised():
    config = BlockConfig(log_det=logdet.exact_log_det)
    assert not config.traceable
    with pytest.raises(NotImplementedError, match="callable log_det"):
        to_dict(ResidualFlowConfig(block=config))


@pytest.mark.parametrize(
    ("fields", "owner", "name", "value"),
    [
        ({"num_blocks": 3}, "flow", "num_blocks", 3),
        ({"solver": "anderson"}, "block", "solver", "anderson"),
        ({"num_blocks": 2, "atol": 1e-5}, "block", "atol", 1e-5),
    ],
)
def test_with_fields_routes_block_fields_to_the_block(fields, owner, name, value):
    config = with_fields(ResidualFlowConfig(), **fields)
    holder = config if owner == "flow" else config.block
    assert getattr(holder, name) == value
    assert with_fields(BlockConfig(), solver="anderson").solver == "anderson"


def test_with_fields_names_an_unknown_field_and_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown ResidualFlowConfig field\(s\) \['blocks'\]; valid: .*num_blocks"
    ):
        with_fields(ResidualFlowConfig(), blocks=3)


@pytest.mark.parametrize(
    ("assignment", "name", "expected"),
    [
        ("blocks_per_scale=4,4", "blocks_per_scale", (4, 4)),
        ("hidden_channels=64", "hidden_channels", 64),
        ("lipschitz_constant=0.9", "lipschitz_constant", 0.9),
        ("factor_out=true", "factor_out", True),
        ("logit_alpha=none", "logit_alpha", None),
        ("initial_power_iterations=none", "initial_power_iterations", None),
        ("fc_hidden_units=", "fc_hidden_units", ()),
        ("solver=anderson", "solver", "anderson"),
        ("atol=1e-5", "atol", 1e-5),
        ("neumann_gradient=false", "neumann_gradient", False),
    ],
)
def test_parse_assignments_reads_each_type(assignment, name, expected):
    config = parse_assignments(ImageFlowConfig(), [assignment])
    holder = config if hasattr(config, name) else config.block
    assert getattr(holder, name) == expected


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("hidden_channels", "expected name=value; got 'hidden_channels'"),
        ("=3", "expected name=value"),
        ("hidden_channel=3", "unknown ImageFlowConfig field(s) ['hidden_channel']"),
        ("hidden_channels=3.5", "hidden_channels must be an integer; got '3.5'"),
        ("factor_out=yes", "factor_out must be true or false; got 'yes'"),
        ("logit_alpha=0.7", "ImageFlowConfig.logit_alpha must be a number in [0, 0.5); got 0.7"),
        ("probe=sphere", "BlockConfig.probe must be one of ('gaussian', 'rademacher')"),
        ("block=x", "set the block's fields by name"),
    ],
)
def test_parse_assignments_rejects_bad_input_naming_it(assignment, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_assignments(ImageFlowConfig(), [assignment])
