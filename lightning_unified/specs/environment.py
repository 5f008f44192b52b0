"""Multi-turn episodes against an environment: ``data_source.environment``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_unified.specs.checks import import_path
from lightning_unified.typecheck import check_fields


@dataclass
class Environment:
    """Multi-turn episodes against an environment (lightning_unified/environments): ``cls``
    names the environment class (an import path such as ``mypkg.envs.MyEnv``, or the class or
    any function returning an environment), made fresh for every episode with ``options`` as
    keyword arguments. None: single-turn sampling."""

    cls: Any = None
    options: dict = field(default_factory=dict)
    # policy turns per episode
    max_turns: int = 4
    # tokens per episode after its first prompt, the policy's and the environment's
    max_tokens: int = 256
    # seconds a tool may run before the policy hears that it timed out
    tool_timeout: float = 10.0

    def __post_init__(self) -> None:
        check_fields(self, "data_source.environment")
        if self.max_turns < 1:
            raise ValueError(f"data_source.environment.max_turns must be >= 1, got {self.max_turns}")
        if self.max_tokens < 1:
            raise ValueError(f"data_source.environment.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.tool_timeout > 0:
            raise ValueError(f"data_source.environment.tool_timeout must be > 0, got {self.tool_timeout}")
        if isinstance(self.cls, str):
            self.cls = import_path(self.cls, "data_source.environment.cls")
        if self.cls is not None and not callable(self.cls):
            raise ValueError(f"data_source.environment.cls must be a class or function that makes an environment, "
                             f"got {self.cls!r}")
        self.options = dict(self.options)

    @property
    def enabled(self) -> bool:
        return self.cls is not None

    def factory(self) -> Callable:
        """Makes one environment (picklable: spawned processes rebuild it)."""
        return functools.partial(self.cls, **self.options)
