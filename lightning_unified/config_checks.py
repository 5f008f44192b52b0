"""Every configured value with a type or a range, checked at the door: before any data or
model loads, each wrong value is named by its key, with what the key accepts.

The types come from the signatures the values are handed to (the Trainer's, the
module's, the task's, the optimizer's, the scheduler's, the model builder's), the ranges
from the tables below; the run's own keys (``seed``, ``resume``, ...) have a table of their
own. The ``data_source``, ``signal`` and ``reference`` dataclasses check their own fields
the same way (:func:`check_fields`), where Python users construct them too. A check that
relates two settings is a rule (:mod:`lightning_unified.rules`), not one of these.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from lightning_unified.losses.aggregation import AGGREGATIONS
from lightning_unified.rules import enforce
from lightning_unified.typecheck import ConfigError, is_number, is_whole, check_value


# --- ranges -----------------------------------------------------------------------------------


def at_least(low: float, whole: bool = True) -> tuple[Callable, str]:
    what = "a whole number" if whole else "a number"
    return (lambda v: (is_whole(v) if whole else is_number(v)) and v >= low), f"{what} >= {low:g}"


def above(low: float) -> tuple[Callable, str]:
    return (lambda v: is_number(v) and v > low), f"a number > {low:g}"


def one_of(*values) -> tuple[Callable, str]:
    return (lambda v: v in values), "one of " + ", ".join(repr(v) for v in values)


def fraction_or_count() -> tuple[Callable, str]:
    """Lightning's limits and intervals: a count of batches (>= 1) or a fraction of them."""
    return ((lambda v: (is_whole(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)),
            "a whole number of batches >= 1 or a fraction in (0, 1]")


def share_or_count() -> tuple[Callable, str]:
    """limit_*_batches: 0 turns them off."""
    return ((lambda v: (is_whole(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1)),
            "a whole number of batches >= 0 or a fraction in [0, 1]")


UINT32 = 2**32 - 1

# the run's own keys (conf/train.yaml), with what each accepts
RUN = {
    "seed": ((lambda v: is_whole(v) and 0 <= v <= UINT32), f"a whole number from 0 to {UINT32}"),
    "resume": ((lambda v: isinstance(v, bool)), "true or false"),
    "ckpt_path": ((lambda v: v is None or isinstance(v, str)), "a checkpoint's path or null"),
    "validate_first": ((lambda v: isinstance(v, bool)), "true or false"),
    "checkpoint_every_n_steps": at_least(1),
    "save_policy": ((lambda v: v is None or (isinstance(v, str) and v.strip() != "")), "a directory name or null"),
    "save_merged": ((lambda v: isinstance(v, bool)), "true or false"),
    "export_every": ((lambda v: v is None or (is_whole(v) and v >= 1)), "a whole number of steps >= 1 or null"),
    "export_keep": ((lambda v: v is None or (is_whole(v) and v >= 1)), "a whole number >= 1 or null"),
    "callbacks": ((lambda v: isinstance(v, list)), "a list of callbacks, each with a _target_"),
}

TRAINER = {
    "max_steps": at_least(-1),
    "max_epochs": ((lambda v: v is None or (is_whole(v) and v >= -1)), "a whole number >= -1 or null"),
    "accumulate_grad_batches": at_least(1),
    "log_every_n_steps": at_least(1),
    "val_check_interval": ((lambda v: v is None or (is_whole(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)),
                           "a whole number of steps >= 1, a fraction of an epoch in (0, 1], or null"),
    "check_val_every_n_epoch": ((lambda v: v is None or (is_whole(v) and v >= 1)), "a whole number >= 1 or null"),
    "num_sanity_val_steps": at_least(-1),
    "gradient_clip_val": ((lambda v: v is None or (is_number(v) and v >= 0)), "a number >= 0 or null"),
    "num_nodes": at_least(1),
    "devices": ((lambda v: v == "auto" or isinstance(v, list) or (is_whole(v) and (v >= 1 or v == -1))
                 or (isinstance(v, str) and v.replace(",", "").strip().isdigit())),
                "a whole number of devices >= 1, -1 (all), 'auto' or a list of device indices"),
    "limit_train_batches": share_or_count(),
    "limit_val_batches": share_or_count(),
}

MODULE = {
    "aggregation": one_of(*AGGREGATIONS),
    "constant_normaliser": above(0),
    "max_tokens_per_row": at_least(1),
    "temperature": above(0),
    "chunk_size": at_least(1),
    "max_new_tokens": at_least(1),
    "samples_every_n_steps": at_least(1),
    "non_finite": one_of("skip", "stop"),
    "max_non_finite_steps": at_least(1),
    "max_failure_fraction": ((lambda v: is_number(v) and 0 <= v <= 1), "a fraction in [0, 1]"),
    "failure_window": at_least(1),
    "peak_flops": above(0),
}

TASK = {
    "batch_size": at_least(1),
    "val_batch_size": at_least(1),
    "num_workers": at_least(0),
    "max_prompt_tokens": at_least(1),
    "max_response_tokens": at_least(1),
    "max_tokens_per_batch": at_least(1),
    "num_train": at_least(1),
    "num_val": at_least(0),
    "digits": at_least(1),
    "seed": ((lambda v: is_whole(v) and v >= 0), "a whole number >= 0"),
}

OPTIMIZER = {
    "lr": above(0),
    "weight_decay": at_least(0, whole=False),
    "eps": above(0),
    "momentum": at_least(0, whole=False),
    "betas": ((lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)),
              "two numbers in [0, 1), e.g. [0.9, 0.999]"),
}

SCHEDULER = {
    "num_warmup_steps": at_least(0),
    "num_training_steps": at_least(1),
}

MODEL = {
    "seed": ((lambda v: is_whole(v) and v >= 0), "a whole number >= 0"),
}


def _ranges(section: Mapping, owner: str, table: Mapping) -> None:
    for key, (ok, accepts) in table.items():
        if key in section and section[key] is not None and not ok(section[key]):
            raise ConfigError(f"{owner}{key} must be {accepts}, got {section[key]!r}")


def _target(section: Mapping):
    from hydra.utils import get_object

    target = section.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        return get_object(target)
    except Exception:  # an unknown target is Hydra's to name when it instantiates
        return None


def _signature_hints(target) -> dict:
    """{argument: annotation} of what a config section is handed to (a class's ``__init__``)."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve in this process: nothing to check against
        return {}
    return {k: v for k, v in hints.items() if k != "return"}


def check_section(section: Mapping | None, owner: str, table: Mapping) -> None:
    """``section``'s values against the annotations of its ``_target_`` and ``table``'s ranges."""
    if not isinstance(section, Mapping):
        return
    target = _target(section)
    hints = _signature_hints(target) if target is not None else {}
    for key, value in section.items():
        if key.startswith("_") or key not in hints:
            continue
        check_value(f"{owner}.{key}", value, hints[key])
    _ranges(section, f"{owner}.", table)


def check_config(cfg: DictConfig) -> None:
    """Every section of a composed run config, before anything is built from it."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an interpolation to a missing key, a resolver's failure
        raise ConfigError(f"the config does not resolve: {error}") from error
    _ranges(values, "", RUN)
    enforce("config", values)  # the rules read before anything is built (lightning_unified.rules)
    check_section(values.get("trainer"), "trainer", TRAINER)
    check_section(values.get("module"), "module", MODULE)
    check_section(values.get("task"), "task", TASK)
    check_section(values.get("optimizer"), "optimizer", OPTIMIZER)
    check_section(values.get("scheduler"), "scheduler", SCHEDULER)
    check_section(values.get("model"), "model", MODEL)
