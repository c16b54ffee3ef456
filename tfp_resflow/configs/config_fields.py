"""The model configs by field name: changed, read from `name=value` strings, written as dicts.

    with_fields(config, **fields)        fields replaced; `BlockConfig` names go to config.block
    parse_assignments(config, strings)   the same from "name=value" (the command line's --model)
    to_dict(config)                      JSON-ready fields (tuples as lists, "inf" for infinity)

One flat namespace of names: a model config's own fields and those of its `BlockConfig` (which
never share a name), so `ResidualFlowBijector(num_blocks=4, solver="anderson")` and
`train_tf.py --model num_blocks=4 solver=anderson` say the same thing.
"""

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from tfp_resflow.configs.flow_configs import BlockConfig

__all__ = ["from_dict", "parse_assignments", "to_dict", "with_fields"]

Config = TypeVar("Config")


def to_dict(config: object) -> dict[str, Any]:
    """JSON-ready fields (tuples as lists, the block config as a dict).

    Raises:
        NotImplementedError: for a callable estimator, which cannot be written down.
    """
    fields = dataclasses.asdict(config)
    block = fields.get("block", fields)
    if callable(block.get("log_det")):
        raise NotImplementedError("a callable log_det cannot be serialised; use a name.")
    return _json_ready(fields)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_json_ready(v) for v in value]
    return "inf" if value == float("inf") else value


def from_dict(cls: type[Config], fields: Mapping[str, Any]) -> Config:
    """Inverse of `to_dict`; an unknown key raises a `TypeError` naming it."""
    return cls(**fields)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def with_fields(config: Config, **fields: Any) -> Config:
    """`config` with fields replaced; names of `BlockConfig` fields go to `config.block`.

    Raises:
        ValueError: for a name that is neither a field of `config` nor of its block config,
            listing the valid names; for a bad value, naming the field.
    """
    own = {k: v for k, v in fields.items() if k in _field_names(type(config))}
    rest = {k: v for k, v in fields.items() if k not in own}
    block_names = _field_names(BlockConfig) if hasattr(config, "block") else ()
    unknown = sorted(k for k in rest if k not in block_names)
    if unknown:
        valid = sorted({*_field_names(type(config)), *block_names} - {"block"})
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {unknown}; valid: {', '.join(valid)}."
        )
    if rest:
        own["block"] = dataclasses.replace(own.get("block", config.block), **rest)
    return dataclasses.replace(config, **own)


def parse_assignments(config: Config, assignments: Iterable[str]) -> Config:
    """`config` with `name=value` assignments applied, each value read by the field's type.

    Lists are comma-separated (`blocks_per_scale=4,4`), `none` is None, bools are
    `true`/`false`. Example: `parse_assignments(ImageFlowConfig(), ["hidden_channels=64"])`.

    Raises:
        ValueError: for a malformed assignment, an unknown field or a bad value.
    """
    types_by_name = {**_field_types(BlockConfig), **_field_types(type(config))}
    fields: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected name=value; got {assignment!r}.")
        if name == "block":
            raise ValueError("set the block's fields by name, e.g. solver=anderson.")
        if name not in types_by_name:
            with_fields(config, **{name: None})  # raises, listing the valid names
        fields[name] = _parse(name, text.strip(), types_by_name[name])
    return with_fields(config, **fields)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(name: str, text: str, annotation: Any) -> Any:
    """`text` as a value of type `annotation` (the types the configs use)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() == "none":
            return None
        for option in args:  # the first type that reads the text; a callable cannot be typed
            if option is type(None) or typing.get_origin(option) is Callable:
                continue
            try:
                return _parse(name, text, option)
            except ValueError:
                continue
        raise ValueError(f"cannot read {name}={text!r}.")
    if origin is tuple:
        return tuple(_parse(name, part.strip(), args[0]) for part in text.split(",") if part)
    if annotation is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false; got {text!r}.")
        return text.lower() == "true"
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ValueError(f"{name} must be {kind}; got {text!r}.") from None
    return text
