"""Tests of `actnorm`'s arguments (its maps and log-dets: tests/bijectors/test_contract.py)."""

import pytest

from tfp_resflow.bijectors.actnorm import ActNorm, ActNormLayer


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ActNormLayer(min_variance=0), "min_variance must be a number > 0; got 0"),
        (lambda: ActNormLayer(min_variance="0.2"), "min_variance must be a number > 0; got '0.2'"),
        (lambda: ActNorm(event_ndims=2), "event_ndims must be 1 or 3; got 2"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_min_variance_is_kept_as_a_float_in_the_config():
    layer = ActNormLayer(min_variance=1)
    assert layer.get_config()["min_variance"] == 1.0
    assert isinstance(layer.min_variance, float)
