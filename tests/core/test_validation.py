"""Tests of the argument checks (`tfp_resflow.core.validation`): accepted values and messages."""

import re

import numpy as np
import pytest

from tfp_resflow.core import validation


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (lambda v: validation.integer("n", v, 1), np.int64(3), 3),
        (lambda v: validation.positive_integer("n", v), 2, 2),
        (lambda v: validation.number("x", v, above=0, below=1), 0.5, 0.5),
        (lambda v: validation.number("x", v, at_least=0), 0, 0.0),
        (lambda v: validation.boolean("b", v), False, False),
        (lambda v: validation.choice("c", v, ("a", "b")), "b", "b"),
        (lambda v: validation.integers("t", v, odd=True), [3, 1], (3, 1)),
        (lambda v: validation.integers("t", v, nonempty=False), (), ()),
        (lambda v: validation.optional(validation.integer, "n", v, 0), None, None),
    ],
)
def test_checks_return_normalised_values(check, value, expected):
    result = check(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: validation.integer("n", v, 1), 0, "n must be an integer >= 1; got 0."),
        (lambda v: validation.integer("n", v, 1), True, "n must be an integer >= 1; got True."),
        (lambda v: validation.integer("n", v, 1), 1.0, "n must be an integer >= 1; got 1.0."),
        (
            lambda v: validation.positive_integer("n", v),
            -2,
            "n must be a positive integer; got -2.",
        ),
        (
            lambda v: validation.number("x", v, above=0, below=1),
            1.0,
            "x must be a number in (0, 1); got 1.0.",
        ),
        (
            lambda v: validation.number("x", v, at_least=0, below=0.5),
            0.5,
            "x must be a number in [0, 0.5); got 0.5.",
        ),
        (lambda v: validation.number("x", v, above=0), float("nan"), "x must be a number > 0"),
        (lambda v: validation.number("x", v, at_least=0), "1", "x must be a number >= 0; got '1'."),
        (lambda v: validation.boolean("b", v), 1, "b must be a bool; got 1."),
        (
            lambda v: validation.choice("c", v, ("a", "b"), extra="a callable"),
            "z",
            "c must be one of ('a', 'b') or a callable; got 'z'.",
        ),
        (
            lambda v: validation.integers("t", v, odd=True),
            (3, 2),
            "t must be a non-empty tuple of odd integers; got (3, 2).",
        ),
        (lambda v: validation.integers("t", v), "4,4", "t must be a non-empty tuple of integers"),
    ],
)
def test_checks_name_the_argument_and_the_value(check, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check(value)
