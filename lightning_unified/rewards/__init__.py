"""Reward functions: built-ins on decoded text (:mod:`text`), answers compared as math
expressions (:mod:`expressions`, the ``math`` extra) and a reward model (:mod:`reward_model`). Any function ``fn(completions, references, ..., **kwargs) -> [B]``
named by its import path works the same way (see :class:`lightning_unified.specs.Reward`)."""

from lightning_unified.rewards.expressions import math_verify
from lightning_unified.rewards.reward_model import RewardModel
from lightning_unified.rewards.text import exact_match, length_penalty, numeric_answer, regex_format

__all__ = ["RewardModel", "exact_match", "length_penalty", "math_verify", "numeric_answer", "regex_format"]
