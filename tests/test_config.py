"""Tests of the model configs (`tfp_resflow.config`): how a block picks its estimators."""

import pytest

from tfp_resflow import logdet
from tfp_resflow.config import BlockConfig


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
