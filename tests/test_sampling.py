"""The sampler's behaviour log-probs are those of the distribution it sampled from, after
temperature and truncation, and responses stop at EOS."""

from __future__ import annotations

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.callbacks.sampling import (
    SamplingCallback,
    mixed_batch_is_on_policy,
    response_mask_until_eos,
)
from lightning_unified.models.loading import response_hidden
from lightning_unified.specs import OnPolicy, Sampling, Sparse
from tests.lightning_helpers import tiny_datamodule, tiny_module


def recomputed_logp(module, batch, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log mu(y_t) from one full forward, with the warpers applied by hand."""
    hidden = response_hidden(module.policy, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK],
                             batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK])
    logits = module.policy.lm_head(hidden).float() / temperature  # [B, R, V]
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.log_softmax(-1).gather(-1, batch[F.RESPONSE_IDS][..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_behaviour_logp_is_the_sampled_distribution(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    spec = OnPolicy(sampling=Sampling(num_generations=3, temperature=temperature, top_k=top_k, top_p=top_p))
    module = tiny_module(spec, Sparse(rewards=[]))
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    SamplingCallback(spec).sample_into(batch, module, max_new_tokens=6, synced=False)

    mask = batch[F.RESPONSE_MASK].bool()
    assert batch[F.RESPONSE_IDS].shape[0] == 18 and batch[F.GROUP_SIZE] == 3
    assert batch[F.PROMPT_IDS].shape[0] == 18 and len(batch[F.REFERENCES]) == 18
    with torch.no_grad():
        expected = recomputed_logp(module, batch, temperature, top_k, top_p)
    assert torch.isfinite(batch[F.BEHAVIOUR_LOGP][mask]).all()
    torch.testing.assert_close(batch[F.BEHAVIOUR_LOGP][mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (batch[F.BEHAVIOUR_LOGP][~mask] == 0).all()
    assert module.policy.training, "sampling must hand the policy back in train mode"


def test_response_mask_stops_after_the_first_eos() -> None:
    eos = 1
    ids = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 5, 1, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(response_mask_until_eos(ids, eos), expected)


def test_mixed_choice_is_deterministic_and_follows_the_probability() -> None:
    draws = [mixed_batch_is_on_policy(0.3, seed=1, global_step=s, batch_idx=s) for s in range(2000)]
    again = [mixed_batch_is_on_policy(0.3, seed=1, global_step=s, batch_idx=s) for s in range(2000)]
    assert draws == again, "every rank (and a resumed run) must make the same choice"
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert all(mixed_batch_is_on_policy(1.0, 0, s, 0) for s in range(10))
    assert not any(mixed_batch_is_on_policy(0.0, 0, s, 0) for s in range(10))
