"""The loss normaliser belongs to the whole optimizer step: splitting a batch into
gradient-accumulation micro-batches, or across DDP ranks, gives the same update as taking
it whole, in every aggregation mode, even when the parts hold different numbers of tokens
(where a per-micro-batch mean would weight them differently)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OffPolicy, Sparse
from lightning_unified.tasks.addition import PromptResponseCollator, PromptResponseDataset, addition_tokenizer
from tests.lightning_helpers import TINY, quiet_trainer

# responses of 1 to 4 characters: the first half of the batch is short, the second long,
# and even rows are short, odd rows long, so every split below is uneven
PROBLEMS = [
    {"prompt": p, "response": r, "reference": r}
    for p, r in [("1+1=", "2"), ("12+30=", "4244"), ("2+2=", "4"), ("40+41=", "8101"),
                 ("3+3=", "6"), ("9+90=", "0999"), ("4+1=", "5"), ("55+5=", "060")]
]


def sgd_step(aggregation: str, batch_size: int, accumulate: int, **trainer_kwargs) -> dict[str, torch.Tensor]:
    tokenizer = addition_tokenizer()
    module = UnifiedModule(
        build_policy(tokenizer, config=TINY, seed=0), tokenizer, OffPolicy(), Sparse(),
        # SGD without clipping: the update is the gradient times lr, so any normaliser error shows
        optimizer=functools.partial(torch.optim.SGD, lr=1.0), aggregation=aggregation, max_new_tokens=4,
    )
    loader = DataLoader(PromptResponseDataset(PROBLEMS), batch_size=batch_size, shuffle=False,
                        collate_fn=PromptResponseCollator(tokenizer))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, accumulate_grad_batches=accumulate, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def assert_same_update(a: dict, b: dict) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_accumulated_micro_batches_equal_one_batch(aggregation: str) -> None:
    whole = sgd_step(aggregation, batch_size=8, accumulate=1)
    assert_same_update(sgd_step(aggregation, batch_size=4, accumulate=2), whole)
    assert_same_update(sgd_step(aggregation, batch_size=2, accumulate=4), whole)


def test_micro_batches_really_are_uneven() -> None:
    """Guards the test above: with equal token counts a per-micro-batch mean would pass too."""
    lengths = [len(p["response"]) + 1 for p in PROBLEMS]  # + EOS
    assert sum(lengths[:4]) != sum(lengths[4:])
    assert sum(lengths[0::2]) != sum(lengths[1::2])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_two_ddp_ranks_equal_one_process(aggregation: str) -> None:
    whole = sgd_step(aggregation, batch_size=8, accumulate=1)
    # each rank takes every other row (a non-shuffling DistributedSampler): 4 short, 4 long
    split = sgd_step(aggregation, batch_size=4, accumulate=1, strategy="ddp_spawn", devices=2)
    assert_same_update(split, whole)
