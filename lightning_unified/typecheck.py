"""A configured value against its annotation, named by its key: what the door checks
(:mod:`lightning_unified.config_checks`) and the specs' dataclasses use alike."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence


class ConfigError(ValueError):
    """A configured value of the wrong type or out of range; names the key."""


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matches(value, hint) -> bool:
    """Whether ``value`` (plain Python, from a resolved config) can be ``hint``; hints that
    a config cannot express (a model class, a dtype object) accept anything."""
    if hint is typing.Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_whole(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence):
        return isinstance(value, Sequence) and not isinstance(value, str)
    if container in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # a callable, a model, a dtype object: not something to check from a config


def describe(hint) -> str:
    """``hint`` in a user's words."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(h) for h in typing.get_args(hint)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    words = {type(None): "null", bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if hint in words:
        return words[hint]
    container = origin or hint
    if container in (list, tuple, Sequence):
        return "a list"
    if container in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def check_value(key: str, value, hint) -> None:
    if not _matches(value, hint):
        raise ConfigError(f"{key} must be {describe(hint)}, got {value!r}")


def check_fields(spec, owner: str) -> None:
    """A dataclass's fields against their annotations (``data_source.sampling.num_generations
    must be a whole number, got 'abc'``), before its own range checks compare them."""
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        if f.name in hints:
            check_value(f"{owner}.{f.name}", getattr(spec, f.name), hints[f.name])


