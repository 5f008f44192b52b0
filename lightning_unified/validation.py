"""Greedy validation: the held-out prompts answered by the rollout engine at temperature 0,
each answer scored by every validation reward."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_unified import batch as fields
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.lightning_private import attached_trainer
from lightning_unified.rewards.scoring import decode_prompts, score_each
from lightning_unified.rewards.text import exact_match


def max_new_tokens(own: int | None, datamodule) -> int:
    """The longest greedy answer: the module's setting, else the datamodule's."""
    value = own or getattr(datamodule, "max_new_tokens", None)
    if value is None:
        raise ValueError("UnifiedModule needs max_new_tokens (the datamodule has no max_new_tokens)")
    return value


def validation_rewards(own: dict[str, Callable] | None, datamodule) -> dict[str, Callable]:
    """{name: reward fn} scoring greedy answers: the module's, else the datamodule's, else
    exact match."""
    if own is not None:
        return dict(own)
    return dict(getattr(datamodule, "val_rewards", None) or {"exact_match": exact_match})


@torch.no_grad()
def greedy_answers(module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
    """``module``'s greedy answers to the prompts, decoded, from its rollout engine."""
    request = GenerationRequest(
        max_new_tokens=module.max_new_tokens, stop_token_ids=tuple(module.stop_token_ids),
        pad_token_id=module.tokenizer.pad_token_id, greedy=True,
        synced=module.trainer.world_size > 1 if attached_trainer(module) is not None else False,
    )
    with module.rollouts.engine_for(module.progress["optimizer_steps"]) as engine:
        rollout = engine.generate(module.policy, prompt_ids, prompt_mask, request)
    return module.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


def score_batch(module, batch: dict) -> dict:
    """{completions, prompts, scores: {reward name: [B] tensor}} of one validation batch."""
    fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="validation_step")
    completions = greedy_answers(module, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK])
    prompts = decode_prompts(module.tokenizer, batch)
    scores = score_each(module.val_rewards, completions=completions, prompts=prompts,
                        references=batch.get(fields.REFERENCES, [None] * len(completions)))
    return {"completions": completions, "prompts": prompts, "scores": scores}


def validate_batch(module, batch: dict) -> dict:
    """One validation step of ``module``: its greedy answers, each validation reward's
    scores added to the module's ``val_metrics`` and logged as ``val/<name>``."""
    result = score_batch(module, batch)
    for name, value in result["scores"].items():
        module.val_metrics[name].update(value.to(module.device))
        module.log(f"val/{name}", module.val_metrics[name], prog_bar=True, batch_size=value.numel())
    return result
