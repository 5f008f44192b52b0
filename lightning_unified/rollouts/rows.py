"""One batch's sampled rows: G responses to each prompt (or G episodes against the
environment) from the engine, with the behaviour log-probs of the distribution sampled
from, under the trainer's precision."""

from __future__ import annotations

import time

import torch

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.environments.sampling import sample_episodes


@torch.no_grad()
def sample_rows(engine, host, prompts: dict, request: GenerationRequest, data_source) -> dict:
    """G responses to each prompt of ``prompts`` (a batch's prompt fields) from ``engine``,
    or G episodes against ``data_source``'s environment, with their behaviour log-probs: the
    fields the sample stage puts into the batch, the prompts they came from, and the
    seconds generation took."""
    group = data_source.sampling.num_generations
    given_ids, given_mask = prompts[fields.PROMPT_IDS], prompts[fields.PROMPT_MASK]
    started = time.perf_counter()
    if data_source.environment.enabled:
        with trainer_precision(host):
            rows = sample_episodes(engine, host, prompts, request, data_source.environment, group)
    else:
        prompt_ids = given_ids.repeat_interleave(group, dim=0)
        prompt_mask = given_mask.repeat_interleave(group, dim=0)
        with trainer_precision(host):
            rollout = engine.generate(host.policy, prompt_ids, prompt_mask, request)
        rows = {fields.PROMPT_IDS: prompt_ids, fields.PROMPT_MASK: prompt_mask,
                fields.RESPONSE_IDS: rollout.response_ids, fields.RESPONSE_MASK: rollout.response_mask,
                fields.BEHAVIOUR_LOGP: rollout.logp}
        if rollout.versions is not None:  # each token's (a server updated in flight changes it within a row)
            rows[fields.TOKEN_VERSION] = rollout.versions
    return {**rows, "source_prompt_ids": given_ids, "seconds": time.perf_counter() - started}
