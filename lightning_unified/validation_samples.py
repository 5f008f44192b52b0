"""Validation beyond greedy: n answers (or episodes) sampled per held-out prompt by the run's
rollout engine, logged as ``val/pass@k`` and ``val/mean@n`` beside the greedy ``val/*``.

Why both: the greedy score says what the policy answers when it must pick one answer;
pass@k says what sampling can reach (whether RL has something to reinforce: a prompt no
sample gets right gives GRPO no signal), and mean@n how often a sample is right, which is
what the training samples are scored on.

Every figure is a per-prompt number first, then a mean over prompts held as a sum and a count
(:func:`~lightning_unified.validation.log_means`), so under DDP each rank scores its own
prompts and the epoch's figure is the sum over all prompts of all ranks over their number,
never a mean of the ranks' means."""

from __future__ import annotations

import dataclasses
import random

import torch
from torch import Tensor

from lightning_unified.engines.base import GenerationRequest
from lightning_unified.lightning_private import attached_trainer
from lightning_unified.validation import greedy_request, log_means, score_batch, validation_environment


def pass_at_k(correct: Tensor, scored: Tensor, k: int) -> Tensor:
    """Chen et al. (2021)'s unbiased pass@k of each prompt, from its n samples: with c of
    the n scored samples correct, 1 - C(n - c, k) / C(n, k), the chance that k of them drawn
    without replacement hold a correct one. With n = k it is 1 if any sample is correct.
    NaN where fewer than k samples were scored (their episode failed, or the score is NaN).

    ``correct``, ``scored``: [P, n] bool (a correct sample is scored).

    >>> pass_at_k(torch.tensor([[True, False, False, False]]), torch.ones(1, 4, dtype=torch.bool), 2).tolist()
    [0.5]
    """
    n = scored.sum(-1, dtype=torch.float64)  # [P]
    c = (correct & scored).sum(-1, dtype=torch.float64)  # [P]
    # C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i): no factorials to overflow
    i = torch.arange(1, scored.shape[-1] + 1, dtype=torch.float64, device=scored.device)  # [n_max]
    in_product = (i > (n - c).unsqueeze(-1)) & (i <= n.unsqueeze(-1))  # [P, n_max]; there, i > n - c >= k
    all_wrong = torch.where(in_product, 1.0 - k / i, 1.0).prod(-1)  # [P]
    estimate = torch.where(n - c < k, 1.0, 1.0 - all_wrong)  # fewer than k wrong samples: every draw holds a right one
    return torch.where(n < k, float("nan"), estimate)


def sampled_figures(scores: dict[str, Tensor], group: int, correct: str, threshold: float,
                    ks: list[int]) -> dict[str, Tensor]:
    """Per-prompt figures of ``group`` samples per prompt (``scores``: {name: [P * group]},
    each prompt's samples consecutive): ``pass@k`` for each k, ``mean@<group>`` (the share
    of scored samples that are correct: score ``correct`` >= ``threshold``) and
    ``<name>/mean@<group>`` (each score's mean over the prompt's scored samples); each [P]."""
    if correct not in scores:
        raise ValueError(f"validation.correct={correct!r} is not a validation score; the scores are "
                         f"{sorted(scores)} (module.val_rewards, and an episode's reward, turns and info)")
    value = scores[correct].double().reshape(-1, group)  # [P, n]
    scored = value.isfinite()
    right = scored & (value >= threshold)
    out = {f"pass@{k}": pass_at_k(right, scored, k) for k in ks}
    out[f"mean@{group}"] = right.sum(-1) / scored.sum(-1)  # NaN where none was scored: left out of the mean
    for name, values in scores.items():
        out[f"{name}/mean@{group}"] = values.double().reshape(-1, group).nanmean(-1)
    return out


def check_correct(module) -> None:
    """Before any validation runs: without an environment, the score ``validation.correct``
    names must be a validation reward (an environment's own numbers are known only once its
    episodes ran, and are checked then)."""
    spec = module.validation
    if not spec.enabled or validation_environment(module) is not None:
        return
    rewards = sorted(module.val_rewards)
    if spec.correct not in rewards:
        raise ValueError(f"validation.correct={spec.correct!r} is not a validation reward; the validation rewards are "
                         f"{rewards} (module.val_rewards, else the task's): name one of them")


def sampled_request(module, batch_idx: int) -> GenerationRequest:
    """Validation's sampled request: ``module.validation``'s distribution, else the run's
    sampler's, else temperature 1; its draws from the validation seed, the batch and the rank."""
    spec = module.validation
    sampling = getattr(module.data_source, "sampling", None)

    def setting(name: str, default):
        own = getattr(spec, name)
        return own if own is not None else getattr(sampling, name, default)

    trainer = attached_trainer(module)
    rank = trainer.global_rank if trainer is not None else 0
    seed = random.Random(f"validation:{spec.seed}:{batch_idx}:{rank}").getrandbits(63)
    return dataclasses.replace(greedy_request(module), greedy=False, seed=seed,
                               temperature=float(setting("temperature", 1.0)), top_p=float(setting("top_p", 1.0)),
                               top_k=int(setting("top_k", 0)))


def validate_samples(module, batch: dict, batch_idx: int) -> dict[str, Tensor]:
    """``module.validation.num_samples`` answers (or episodes) per prompt of one validation
    batch, from the run's rollout engine, their figures logged as ``val/pass@k``,
    ``val/mean@n`` and ``val/<score>/mean@n``; returns the per-prompt figures."""
    spec = module.validation
    result = score_batch(module, batch, sampled_request(module, batch_idx), group=spec.num_samples)
    figures = sampled_figures(result["scores"], spec.num_samples, spec.correct, spec.threshold, spec.ks)
    headline = {k: v for k, v in figures.items() if "/" not in k}
    log_means(module, headline, prog_bar=True)
    log_means(module, {k: v for k, v in figures.items() if k not in headline}, prog_bar=False)
    return figures
