"""Reward functions as a sparse signal or online DPO takes them: ``signal.rewards``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Reward:
    """A reward function and its weight in the sum.

    ``fn(completions=list[str], references=list[str], completion_ids=[B, R],
    completion_mask=[B, R]) -> [B]`` (take ``**kwargs`` for what you do not use). Hydra
    builds it from ``_target_`` with ``_partial_: true``.
    """

    fn: Callable
    weight: float = 1.0


def as_rewards(rewards) -> list[Reward]:
    """Each entry of ``signal.rewards`` as a :class:`Reward`: a Reward stays as it is, and a
    bare function counts with weight 1 (as TRL's ``reward_funcs=[fn]`` does), Hydra's
    ``{_target_: mypkg.my_reward, _partial_: true}`` included."""
    out = []
    for i, reward in enumerate(rewards or []):
        if isinstance(reward, Reward):
            out.append(reward)
        elif callable(reward):
            out.append(Reward(fn=reward))
        else:
            raise TypeError(f"signal.rewards[{i}] must be a reward function or a Reward (fn and weight), got "
                            f"{type(reward).__name__}: {reward!r}")
    return out
