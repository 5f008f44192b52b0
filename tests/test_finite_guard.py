"""No non-finite step reaches the weights: a NaN gradient step is skipped (weights and
optimizer state untouched) and counted, and too many in a row stop the run with a
diagnostic naming the step, the batch and the field."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_unified import batch as F
from lightning_unified.callbacks.finite_guard import NonFiniteError, NonFiniteGuard
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OffPolicy, Sparse
from lightning_unified.tasks.addition import PromptResponseCollator, PromptResponseDataset, addition_tokenizer
from tests.lightning_helpers import TINY, quiet_trainer

PROBLEMS = [{"prompt": f"{a}+{a}=", "response": str(2 * a), "reference": str(2 * a)} for a in range(1, 9)]


class RewardedCollator(PromptResponseCollator):
    """Data with a reward column; the rewards of the batches in ``poisoned`` are NaN."""

    def __init__(self, tokenizer, poisoned: set[int]):
        super().__init__(tokenizer)
        self.poisoned, self.calls = poisoned, 0

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch[F.REWARDS] = torch.full((len(examples),), float("nan") if self.calls in self.poisoned else 1.0)
        self.calls += 1
        return batch


class Snapshots(L.Callback):
    def __init__(self):
        self.weights, self.adam_steps, self.skipped_logged = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.policy.named_parameters()})
        logged = trainer.callback_metrics.get("train/skipped_steps")
        self.skipped_logged.append(None if logged is None else float(logged))
        state = trainer.optimizers[0].state
        self.adam_steps.append(max((float(s["step"]) for s in state.values()), default=0.0))


def fit(poisoned: set[int], steps: int, log_every_n_steps: int = 50, **module_kwargs):
    tokenizer = addition_tokenizer()
    module = UnifiedModule(build_policy(tokenizer, config=TINY, seed=0), tokenizer, OffPolicy(), Sparse(reward_data=True),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), max_new_tokens=4,
                           samples_every_n_steps=None, **module_kwargs)
    loader = DataLoader(PromptResponseDataset(PROBLEMS), batch_size=2, collate_fn=RewardedCollator(tokenizer, poisoned))
    snapshots = Snapshots()
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[snapshots],
                  log_every_n_steps=log_every_n_steps).fit(module, train_dataloaders=loader)
    return module, snapshots


def test_a_nan_step_is_skipped_and_counted() -> None:
    module, snap = fit(poisoned={1}, steps=4)
    guard = next(c for c in module.loop_callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 1
    for name, value in snap.weights[1].items():
        assert torch.equal(value, snap.weights[0][name]), f"{name} moved in the skipped step"
        assert torch.isfinite(value).all()
    assert any(not torch.equal(v, snap.weights[1][k]) for k, v in snap.weights[2].items()), "training went on"
    assert snap.adam_steps == [1.0, 1.0, 2.0, 3.0], "the optimizer's own state skipped the step too"
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    # logged at the skip itself, though Lightning writes only every 50th step here
    assert snap.skipped_logged == [None, 1.0, 1.0, 1.0]


def test_the_skipped_count_is_logged_on_every_step_lightning_writes() -> None:
    _, snap = fit(poisoned={2}, steps=5, log_every_n_steps=2)
    # steps 2 and 4 (counted from 1) are written, step 3 is the skip
    assert snap.skipped_logged == [None, 0.0, 1.0, 1.0, 1.0]


def test_too_many_bad_steps_in_a_row_stop_with_a_diagnostic() -> None:
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradient \(batch 3: rewards, advantages; batch 3: loss\); "
                                             r"2 bad steps in a row"):
        fit(poisoned={2, 3}, steps=6, max_non_finite_steps=2)
    with pytest.raises(NonFiniteError, match=r"step 0: non-finite gradient \(batch 0: rewards.*guard.mode=stop"):
        fit(poisoned={0}, steps=2, non_finite="stop")


def test_without_the_guard_nan_reaches_the_weights() -> None:
    """Guards the tests above: the poisoned data really does produce a NaN update."""
    module, _ = fit(poisoned={1}, steps=2, non_finite=None)
    assert not all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_bad_guard_settings_are_named() -> None:
    with pytest.raises(ValueError, match="guard.mode must be one of"):
        NonFiniteGuard(mode="ignore")


class RankOneNaN(RewardedCollator):
    """Under DDP: only rank 1's second batch has NaN rewards."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1 and self.calls == 2:
            batch[F.REWARDS] = torch.full((len(examples),), float("nan"))
        return batch


def test_under_ddp_every_rank_skips_the_same_step() -> None:
    """Two gloo ranks; one rank's batch is bad. Both skip (had rank 0 stepped, its weights
    would hold the NaN the gradient all-reduce brought it), and training goes on."""
    tokenizer = addition_tokenizer()
    module = UnifiedModule(build_policy(tokenizer, config=TINY, seed=0), tokenizer, OffPolicy(), Sparse(reward_data=True),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), max_new_tokens=4,
                           samples_every_n_steps=None)
    start = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    loader = DataLoader(PromptResponseDataset(PROBLEMS), batch_size=2, collate_fn=RankOneNaN(tokenizer, set()))
    quiet_trainer(max_steps=3, limit_val_batches=0, strategy="ddp_spawn", devices=2).fit(module, train_dataloaders=loader)
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert any(not torch.equal(p.detach(), start[k]) for k, p in module.policy.named_parameters())


def test_trust_remote_code_is_off_unless_set() -> None:
    from tests.lightning_helpers import compose_config

    cfg = compose_config([])
    assert cfg.model.trust_remote_code is False and cfg.teacher.trust_remote_code is False
    assert compose_config(["reference=k3"]).reference.options.trust_remote_code is False
