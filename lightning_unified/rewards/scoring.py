"""Scoring completions: the weighted sum of reward functions, each checked, and the decoded
text they read. Shared by training (the reward and preference callbacks) and validation."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_unified import batch as fields
from lightning_unified.specs import Reward


def reward_name(reward: Reward) -> str:
    fn = getattr(reward.fn, "func", reward.fn)
    return getattr(fn, "__name__", type(fn).__name__)


def names_parameter(fn: Callable, name: str) -> bool:
    """Whether ``fn``'s signature names ``name`` (``**kwargs`` alone does not): inputs that
    cost work to make, such as the decoded prompts, go only to functions that ask for them."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no inspectable signature: give it everything
        return True


def compute_rewards(rewards: list[Reward], **inputs) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of every reward function, [B], and each one's batch mean. A
    function that raises, or returns the wrong shape or a non-finite value, is named."""
    total, parts = None, {}
    size = len(inputs["completions"])
    for reward in rewards:
        name = reward_name(reward)
        try:
            value = torch.as_tensor(reward.fn(**inputs), dtype=torch.float32).cpu()
        except Exception as error:
            raise RuntimeError(f"reward {name} raised {type(error).__name__}: {error}") from error
        if value.shape != (size,):
            raise ValueError(
                f"reward {name} returned shape {tuple(value.shape)}; it must return one float per completion, "
                f"shape ({size},)"
            )
        if not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            raise ValueError(f"reward {name} returned non-finite values {value[bad].tolist()} for completions {bad}")
        parts[name] = value.mean()
        total = reward.weight * value if total is None else total + reward.weight * value
    return total, parts


def decode_responses(tokenizer, batch: dict) -> list[str]:
    ids, mask = batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK]
    return tokenizer.batch_decode(torch.where(mask.bool(), ids, tokenizer.pad_token_id), skip_special_tokens=True)


def decode_prompts(tokenizer, batch: dict) -> list[str]:
    ids, mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
    return tokenizer.batch_decode(torch.where(mask.bool(), ids, tokenizer.pad_token_id), skip_special_tokens=True)


def score_each(rewards: dict[str, Callable], **inputs) -> dict[str, Tensor]:
    """{name: [B] scores} of each reward function on its own (validation's ``val/<name>``)."""
    return {name: compute_rewards([Reward(fn)], completion_ids=None, completion_mask=None, **inputs)[0]
            for name, fn in rewards.items()}
