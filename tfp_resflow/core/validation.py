"""Argument checks shared by the package: every message names the argument and the value.

Each check returns the value normalised (ints as `int`, numbers as `float`, sequences as tuples)
or raises `ValueError("<name> must be <expected>; got <value>.")`, so a mistake is reported
where it is made, in one wording across constructors, configs and the command line.
"""

import numbers
from collections.abc import Collection
from typing import Any

import tensorflow as tf

__all__ = [
    "batch_of_events",
    "boolean",
    "choice",
    "fail",
    "image_shape",
    "integer",
    "integers",
    "number",
    "optional",
    "positive_integer",
]


def batch_of_events(name: str, value: object) -> tf.Tensor:
    """A floating tensor of shape `[batch, *event]` (rank >= 2)."""
    t = tf.convert_to_tensor(value)
    if not t.dtype.is_floating:
        raise ValueError(f"{name} must be a floating tensor; got dtype {t.dtype.name}.")
    if t.shape.rank is not None and t.shape.rank < 2:
        raise ValueError(f"{name} must have shape [batch, *event_shape]; got shape {t.shape}.")
    return t


def fail(name: str, expected: str, value: object) -> None:
    """Raises the package's `ValueError` for `name`, which must be `expected`."""
    raise ValueError(f"{name} must be {expected}; got {value!r}.")


def _is_integer(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def integer(name: str, value: object, minimum: int = 0) -> int:
    """An integer `>= minimum` (bools are not integers here)."""
    if not (_is_integer(value) and value >= minimum):
        fail(name, f"an integer >= {minimum}", value)
    return int(value)


def positive_integer(name: str, value: object) -> int:
    """An integer >= 1, worded as a count ("a positive integer")."""
    if not (_is_integer(value) and value >= 1):
        fail(name, "a positive integer", value)
    return int(value)


def number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> float:
    """A real number (not NaN) with optional bounds: `> above`, `>= at_least`, `< below`."""
    ok = _is_real(value) and value == value  # noqa: PLR0124 (NaN check)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below)
    if not ok:
        low = f"({above}" if above is not None else f"[{at_least}" if at_least is not None else ""
        if low and below is not None:
            expected = f"a number in {low}, {below})"
        elif above is not None:
            expected = f"a number > {above}"
        elif at_least is not None:
            expected = f"a number >= {at_least}"
        elif below is not None:
            expected = f"a number < {below}"
        else:
            expected = "a number"
        fail(name, expected, value)
    return float(value)


def boolean(name: str, value: object) -> bool:
    """A bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(name, "a bool", value)
    return value


def choice(name: str, value: object, choices: Collection[str], *, extra: str = "") -> str:
    """One of `choices` (`extra` names what else the caller accepts, e.g. "a callable")."""
    if not isinstance(value, str) or value not in choices:
        fail(name, f"one of {tuple(choices)}" + (f" or {extra}" if extra else ""), value)
    return value


def integers(
    name: str, value: object, *, minimum: int = 1, odd: bool = False, nonempty: bool = True
) -> tuple[int, ...]:
    """A tuple (or list) of integers `>= minimum`, optionally odd, optionally non-empty."""
    ok = isinstance(value, tuple | list) and (len(value) > 0 or not nonempty)
    ok = ok and all(_is_integer(n) and n >= minimum and (not odd or n % 2) for n in value)
    if not ok:
        kind = "odd integers" if odd else f"integers >= {minimum}"
        fail(name, f"{'a non-empty' if nonempty else 'a'} tuple of {kind}", value)
    return tuple(int(n) for n in value)


def image_shape(name: str, value: object) -> tuple[int, int, int]:
    """`(height, width, channels)`: three integers >= 1."""
    if not (isinstance(value, tuple | list) and len(value) == 3):
        fail(name, "(height, width, channels) of positive integers", value)
    return integers(name, value, minimum=1)  # type: ignore[return-value]


def optional(check: Any, name: str, value: object, *args: Any, **kwargs: Any) -> Any:
    """`None`, or `check(name, value, ...)`."""
    return None if value is None else check(name, value, *args, **kwargs)
