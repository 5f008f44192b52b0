"""The sampler's behaviour log-probs are those of the distribution it sampled from, after
temperature and truncation, and responses stop at EOS."""

from __future__ import annotations

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.stages.sample import (
    SampleStage,
    mixed_batch_is_on_policy,
)
from lightning_unified.engines.base import mask_after_stop
from lightning_unified.models.forward import response_hidden
from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
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


@pytest.mark.parametrize("behaviour", ["sampled", "tempered"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_behaviour_logp_is_the_documented_distribution(temperature: float, top_k: int, top_p: float,
                                                       behaviour: str) -> None:
    """``sampled``: the tempered, truncated distribution actually sampled from;
    ``tempered``: the tempered one before truncation."""
    torch.manual_seed(0)
    spec = OnPolicy(sampling=Sampling(num_generations=3, temperature=temperature, top_k=top_k, top_p=top_p,
                                      behaviour=behaviour))
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    SampleStage(spec).sample_into(batch, module, max_new_tokens=6, synced=False)

    mask = batch[F.RESPONSE_MASK].bool()
    assert batch[F.RESPONSE_IDS].shape[0] == 18 and batch[F.GROUP_SIZE] == 3
    assert batch[F.PROMPT_IDS].shape[0] == 18 and len(batch[F.REFERENCES]) == 18
    with torch.no_grad():
        if behaviour == "sampled":
            expected = recomputed_logp(module, batch, temperature, top_k, top_p)
        else:
            expected = recomputed_logp(module, batch, temperature, 0, 1.0)
    assert torch.isfinite(batch[F.BEHAVIOUR_LOGP][mask]).all()
    torch.testing.assert_close(batch[F.BEHAVIOUR_LOGP][mask], expected[mask], atol=1e-4, rtol=1e-4)
    assert (batch[F.BEHAVIOUR_LOGP][~mask] == 0).all()
    assert module.policy.training, "sampling must hand the policy back in train mode"


def test_response_mask_stops_after_the_first_eos() -> None:
    eos = 1
    ids = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 5, 1, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(mask_after_stop(ids, (eos,)), expected)


def test_mixed_choice_is_deterministic_and_follows_the_probability() -> None:
    draws = [mixed_batch_is_on_policy(0.3, seed=1, epoch=s, batch_idx=s) for s in range(2000)]
    again = [mixed_batch_is_on_policy(0.3, seed=1, epoch=s, batch_idx=s) for s in range(2000)]
    assert draws == again, "every rank (and a resumed run) must make the same choice"
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert all(mixed_batch_is_on_policy(1.0, 0, s, 0) for s in range(10))
    assert not any(mixed_batch_is_on_policy(0.0, 0, s, 0) for s in range(10))


@pytest.mark.parametrize("behaviour", ["tempered", "sampled"])
def test_ratio_before_any_update_at_temperature_and_top_p(behaviour: str) -> None:
    """At temperature 0.7 and top-p 0.9 the loss follows the sampler's temperature. With the
    tempered behaviour the ratio before any update is 1; with the sampled (truncated) one,
    each token's ratio is the nucleus mass that step kept."""
    import lightning as L

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batch, self.target_logp = dict(batch), outputs["target_logp"]

    spec = OnPolicy(sampling=Sampling(num_generations=4, temperature=0.7, top_p=0.9, behaviour=behaviour))
    module = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
    assert module.temperature == 0.7, "the loss follows the sampler's temperature"
    spy = Spy()
    from tests.lightning_helpers import quiet_trainer
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[spy]).fit(module, datamodule=tiny_datamodule(batch_size=8))
    mask = spy.batch[F.RESPONSE_MASK].bool()
    rho = (spy.target_logp - spy.batch[F.BEHAVIOUR_LOGP])[mask].exp()
    if behaviour == "tempered":
        assert 0.98 <= float(rho.mean()) <= 1.02
        torch.testing.assert_close(rho, torch.ones_like(rho), atol=1e-4, rtol=1e-4)
    else:
        # the kept mass of each step's nucleus, from the sampler's own (pre-step) policy
        with torch.no_grad():
            before = tiny_module(spec, Sparse(rewards=[Reward(digit_match)]))
            tempered = recomputed_logp(before, spy.batch, 0.7, 0, 1.0)
            truncated = recomputed_logp(before, spy.batch, 0.7, 0, 0.9)
        kept_mass = (tempered - truncated)[mask].exp()
        torch.testing.assert_close(rho, kept_mass, atol=1e-4, rtol=1e-4)
        assert float(rho.mean()) < 0.98, "truncation to the nucleus shows in the ratio"
