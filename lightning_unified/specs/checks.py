"""The single-setting checks the specs share: a value among the allowed ones. A check that
relates two settings is a rule (:mod:`lightning_unified.rules`), not one of these."""

from __future__ import annotations

import importlib


def one_of(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


def import_path(path: str, key: str):
    """The object ``module.Name`` names, or an error naming ``key`` and what is wrong."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={path!r} is not an import path (module.Name, e.g. mypkg.envs.MyEnv)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}={path!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from error
    if not hasattr(module, name):
        raise ValueError(f"{key}={path!r}: module {module_name!r} has no {name!r}")
    return getattr(module, name)
