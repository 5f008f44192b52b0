"""The run's rules: every check that relates two settings or more, in one table.

A single setting checks itself where it is declared (a range, a name among the allowed
ones: the specs' ``__post_init__``, :mod:`lightning_unified.config_checks`). Whatever spans two
settings is a :class:`Rule` here: a name, the settings it relates as users type them, and
a check that returns the message a run stops with (None when the settings agree). Each
rule runs as soon as everything it reads exists: a spec's own rules when the spec is built
(``Dense(...)`` refuses a divergence its teacher cannot give), the method's when the
module is (:func:`lightning_unified.pipeline.method_stages`), the trainer's at ``setup``.

``docs/rules.md`` is this table (``python -m lightning_unified.rules`` writes it; a test
holds the two together), and ``tests/test_rules.py`` breaks every rule once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from lightning_unified.typecheck import ConfigError

log = logging.getLogger(__name__)

# what each scope's checks are handed, in order
SCOPES = {
    "config": "the composed config's values (a mapping, before anything is built)",
    "sampling": "data_source.sampling (a Sampling)",
    "importance": "data_source.importance (an Importance)",
    "on_policy": "data_source (an OnPolicy)",
    "teacher": "one teacher's settings (the teacher group, an entry of signal.teachers, a served reference)",
    "dense": "signal (a Dense)",
    "reference": "reference (a Reference)",
    "method": "the method (a Method: data_source, signal, reference, the loss's temperature)",
    "trainer": "the Lightning Trainer and the module (its data_source and signal)",
}


class RuleError(ConfigError):
    """Settings that break a rule; ``rule`` is its name in :data:`RULES`."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class Rule:
    name: str
    scope: str
    settings: tuple[str, ...]
    check: Callable[..., str | None]
    # error: the run stops; warning: it is said once and the run goes on (an ablation)
    severity: str = "error"

    @property
    def summary(self) -> str:
        """What the rule asks, in one line (the check's docstring)."""
        return " ".join((self.check.__doc__ or "").split())


RULES: dict[str, Rule] = {}


def rule(name: str, scope: str, *settings: str, severity: str = "error"):
    """Registers the decorated check as rule ``name`` of ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"rule {name!r}: scope must be one of {list(SCOPES)}, got {scope!r}")

    def register(check: Callable[..., str | None]) -> Callable[..., str | None]:
        if name in RULES:
            raise ValueError(f"two rules are named {name!r}")
        RULES[name] = Rule(name, scope, settings, check, severity)
        return check

    return register


def enforce(scope: str, *specs, owner: str | None = None) -> None:
    """Every rule of ``scope`` on ``specs``, in the table's order: the first broken rule
    stops the run with its message; a warning is logged and the next rule runs.
    ``owner``: where the settings were given, for the scopes one spec serves in several
    places (a teacher entry: ``teacher``, ``signal.teachers.NAME``, ``reference``)."""
    for entry in RULES.values():
        if entry.scope != scope:
            continue
        message = entry.check(*specs, owner) if owner is not None else entry.check(*specs)
        if message is None:
            continue
        if entry.severity == "warning":
            log.warning("%s", message)
        else:
            raise RuleError(message, entry.name)


def table() -> str:
    """The rules as the Markdown table of ``docs/rules.md``."""
    lines = ["| rule | settings it relates | what it asks |", "|---|---|---|"]
    for entry in RULES.values():
        settings = ", ".join(f"`{s}`" for s in entry.settings)
        warning = " (a warning: the run goes on)" if entry.severity == "warning" else ""
        lines.append(f"| `{entry.name}` | {settings} | {entry.summary}{warning} |")
    return "\n".join(lines) + "\n"


# the tables, registered on import (each module reads only the specs it is handed)
from lightning_unified.rules import sampling, teacher, reference, method  # noqa: E402,F401
