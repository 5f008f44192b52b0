"""A training batch's episodes: its prompts handed to fresh environments, the episodes run
through the rollout engine, and their rows in the batch's fields (the sample stage's half of
multi-turn sampling; the episode loop itself is :mod:`~lightning_unified.environments.episodes`)."""

from __future__ import annotations

import torch

from lightning_unified import batch as fields
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.environments.episodes import EpisodeLimits, episode_metrics, episode_rows, run_episodes


def reset_rows(prompts: dict, tokenizer) -> list[dict]:
    """What each environment's ``reset`` gets: the row's prompt as the data gave it (text or
    messages; decoded from its tokens when the loader gives none), reference and index."""
    n = prompts[fields.PROMPT_IDS].shape[0]
    texts = prompts.get(fields.PROMPTS)
    if texts is None:
        ids, mask = prompts[fields.PROMPT_IDS], prompts[fields.PROMPT_MASK]
        texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=False) for row, m in zip(ids, mask)]
    references = prompts.get(fields.REFERENCES) or [None] * n
    index = prompts.get(fields.EXAMPLE_INDEX)
    index = index.tolist() if isinstance(index, torch.Tensor) else [None] * n
    return [{"prompt": texts[i], "reference": references[i], "index": index[i]} for i in range(n)]


def limits_of(spec) -> EpisodeLimits:
    return EpisodeLimits(spec.max_turns, spec.max_tokens, spec.tool_timeout)


def sample_episodes(engine, pl_module, prompts: dict, request: GenerationRequest, spec, group: int) -> dict:
    """``group`` episodes per prompt against ``spec``'s environment (a
    :class:`~lightning_unified.specs.Environment`): the sampled rows' fields, each row's
    episode and prompt, every row's episode reward, the rows of failed episodes and their
    failures, and the episodes' metrics."""
    device = prompts[fields.PROMPT_IDS].device
    episodes = run_episodes(engine, pl_module.policy, pl_module.tokenizer, reset_rows(prompts, pl_module.tokenizer),
                            spec.factory(), request, limits_of(spec), device, group=group)
    out = episode_rows(episodes, request.pad_token_id, device)
    return {fields.PROMPT_IDS: out["prompt_ids"], fields.PROMPT_MASK: out["prompt_mask"],
            fields.RESPONSE_IDS: out["response_ids"], fields.RESPONSE_MASK: out["response_mask"],
            fields.LOSS_MASK: out["loss_mask"], fields.BEHAVIOUR_LOGP: out["logp"],
            fields.EPISODE: out["episode"], "prompt_index": out["prompt_index"],
            fields.ENVIRONMENT_REWARDS: out["episode_rewards"][torch.tensor(out["episode"], device=device)],
            # the episodes whose environment raised (plain tuples: a checkpoint may keep rows sampled ahead)
            fields.FAILED: out["failed"], "failures": out["failures"], "episodes": len(episodes),
            "environment": episode_metrics(episodes)}
