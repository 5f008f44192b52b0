"""Validation: the held-out prompts answered by the rollout engine at temperature 0, each
answer scored by every validation reward; with ``validation.num_samples``, k sampled answers
per prompt too (:mod:`lightning_unified.validation_samples`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torchmetrics import MeanMetric

from lightning_unified import batch as fields
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.environments.episodes import run_episodes
from lightning_unified.environments.sampling import limits_of, reset_rows
from lightning_unified.lightning_private import attached_trainer
from lightning_unified.rewards.scoring import decode_prompts, score_each
from lightning_unified.rewards.text import exact_match

log = logging.getLogger(__name__)


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


def greedy_request(module) -> GenerationRequest:
    """Validation's request: greedy, the module's longest answer, every rank in step."""
    return GenerationRequest(
        max_new_tokens=module.max_new_tokens, stop_token_ids=tuple(module.stop_token_ids),
        pad_token_id=module.tokenizer.pad_token_id, greedy=True,
        synced=module.trainer.world_size > 1 if attached_trainer(module) is not None else False,
    )


@torch.no_grad()
def greedy_answers(module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   request: GenerationRequest | None = None) -> list[str]:
    """``module``'s answers to the prompts, decoded, from its rollout engine: greedy, or as
    ``request`` asks."""
    request = request if request is not None else greedy_request(module)
    with module.rollouts.engine_for(module.progress["optimizer_steps"]) as engine:
        rollout = engine.generate(module.policy, prompt_ids, prompt_mask, request)
    return module.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


def validation_environment(module):
    """What validation's episodes talk to: ``module.val_environment`` when set, else the
    run's ``data_source.environment``, else the datamodule's own ``environment`` (a task
    that is asked through one); None: one greedy answer per prompt."""
    own = getattr(module, "val_environment", None)
    if own is not None and own.enabled:
        return own
    data_source = getattr(module, "data_source", None)
    if data_source is not None and data_source.samples and data_source.environment.enabled:
        return data_source.environment
    trainer = attached_trainer(module)
    spec = getattr(getattr(trainer, "datamodule", None), "environment", None)
    return spec if spec is not None and spec.enabled else None


@torch.no_grad()
def greedy_episodes(module, batch: dict, spec, request: GenerationRequest | None = None, group: int = 1) -> dict:
    """One greedy episode per held-out prompt (or ``group`` per prompt, as ``request``
    asks, each prompt's together): each one's last reply, and its reward, turns and
    ``info`` (the environment's numbers) as scores."""
    request = request if request is not None else greedy_request(module)
    with module.rollouts.engine_for(module.progress["optimizer_steps"]) as engine:
        episodes = run_episodes(engine, module.policy, module.tokenizer, reset_rows(batch, module.tokenizer),
                                spec.factory(), request, limits_of(spec), batch[fields.PROMPT_IDS].device,
                                group=group)
    completions = [next((m["content"] for m in reversed(e.messages) if m["role"] == "assistant"), "")
                   for e in episodes]
    failed = [e for e in episodes if e.failed is not None]
    if failed:  # an episode whose environment raised has no score: NaN, which the means leave out
        log.error("validation: %d of %d episodes failed (their environment raised), left out of val/*; the first: "
                  "%s\n%s", len(failed), len(episodes), failed[0].failed.what, failed[0].failed.details)
    nan = float("nan")
    scores = {"reward": torch.tensor([nan if e.failed else e.reward for e in episodes]),
              "turns": torch.tensor([nan if e.failed else float(e.counts["turns"]) for e in episodes])}
    for name in sorted({k for e in episodes for k in e.info}):
        scores[name] = torch.tensor([nan if e.failed else e.info.get(name, nan) for e in episodes])
    return {"completions": completions, "scores": scores}


def score_batch(module, batch: dict, request: GenerationRequest | None = None, group: int = 1) -> dict:
    """{completions, prompts, scores: {reward name: [B * group] tensor}} of one validation
    batch: one greedy answer per prompt, or ``group`` answers per prompt as ``request`` asks
    (each prompt's consecutive)."""
    fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="validation_step")
    spec = validation_environment(module)
    prompts = decode_prompts(module.tokenizer, batch)
    references = batch.get(fields.REFERENCES, [None] * len(prompts))
    prompts, references = ([x for x in column for _ in range(group)] for column in (prompts, references))
    if spec is not None:
        result = greedy_episodes(module, batch, spec, request, group)
        clash = sorted(set(result["scores"]) & set(module.val_rewards))
        if clash:
            raise ValueError(f"validation reward(s) {clash} have the names of the episodes' own numbers (reward, turns "
                             f"and the environment's info: {sorted(result['scores'])}); rename them in val_rewards")
        result["scores"].update(score_each(module.val_rewards, completions=result["completions"], prompts=prompts,
                                           references=references))
        return {**result, "prompts": prompts}
    completions = greedy_answers(module, batch[fields.PROMPT_IDS].repeat_interleave(group, dim=0),
                                 batch[fields.PROMPT_MASK].repeat_interleave(group, dim=0), request)
    scores = score_each(module.val_rewards, completions=completions, prompts=prompts, references=references)
    return {"completions": completions, "prompts": prompts, "scores": scores}


def validate_batch(module, batch: dict) -> dict:
    """One validation step of ``module``: its greedy answers, each validation reward's
    scores added to the module's ``val_metrics`` and logged as ``val/<name>``."""
    result = score_batch(module, batch)
    log_means(module, result["scores"], prog_bar=True)
    return result


def log_means(module, values: dict[str, torch.Tensor], prog_bar: bool) -> None:
    """Each [N] tensor of ``values`` into the module's ``val_metrics`` mean of that name,
    logged as ``val/<name>``: a sum and a count, reduced over every rank at the epoch's
    end (NaN rows left out)."""
    for name, value in values.items():
        if name not in module.val_metrics:  # an environment's own numbers, known once its episodes ran
            module.val_metrics[name] = MeanMetric(nan_strategy="ignore").to(module.device)
        module.val_metrics[name].update(value.to(module.device))
        module.log(f"val/{name}", module.val_metrics[name], prog_bar=prog_bar, batch_size=value.numel(),
                   metric_attribute=f"val_metrics.{name}")
