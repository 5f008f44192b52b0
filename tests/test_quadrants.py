"""The four quadrants (and the mixed source) end to end on a tiny Llama: the pipeline adds
exactly the fields each needs, and one optimizer step changes every policy parameter."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.specs import (
    Dense,
    Importance,
    OffPolicy,
    OnPolicy,
    Reward,
    Sampling,
    Sparse,
)
from lightning_unified.tasks.addition import digit_match, exact_match
from tests.lightning_helpers import (
    quiet_trainer,
    save_tiny_teacher,
    tiny_datamodule,
    tiny_module,
)

BASE = {F.PROMPT_IDS, F.PROMPT_MASK, F.REFERENCES, F.PROMPTS, F.EXAMPLE_INDEX, F.RESPONSE_IDS, F.RESPONSE_MASK,
        F.LOSS_MASK}
SAMPLED = {F.BEHAVIOUR_LOGP, F.GROUP_SIZE, F.POLICY_VERSION, F.SAMPLED}
REWARDS = [Reward(exact_match), Reward(digit_match, weight=0.5)]
# rewards add each row's score, and which rows no reward function could score (failed)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def on_policy(ratio: str = "truncated", probability: float = 1.0) -> OnPolicy:
    return OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio=ratio), probability=probability)


def quadrants(teacher: str) -> dict[str, tuple]:
    """name -> (data_source, signal, the batch fields the training step must see)"""
    return {
        "sft": (OffPolicy(), Sparse(), BASE),
        "dft": (OffPolicy(), Sparse(weighting="dft"), BASE),
        "reward_weighted_sft": (OffPolicy(), Sparse(rewards=REWARDS, reward_data=True), BASE | {F.REWARDS, F.ADVANTAGES, F.COMPLETIONS, F.FAILED}),
        "distill": (OffPolicy(), Dense(teacher=teacher), BASE | {F.TEACHER}),
        "distill_topk": (OffPolicy(), Dense(teacher=teacher, top_k=4), BASE | {F.TEACHER_TOPK_IDS, F.TEACHER_TOPK_LOGP}),
        "rl": (on_policy(), Sparse(rewards=REWARDS), BASE | SAMPLED | {F.REWARDS, F.ADVANTAGES, F.COMPLETIONS, F.FAILED}),
        "rl_ppo": (on_policy("ppo_clip"), Sparse(rewards=REWARDS, advantage="rloo"), BASE | SAMPLED | {F.REWARDS, F.ADVANTAGES, F.COMPLETIONS, F.FAILED}),
        "rl_gspo": (on_policy("sequence_clip"), Sparse(rewards=REWARDS), BASE | SAMPLED | {F.REWARDS, F.ADVANTAGES, F.COMPLETIONS, F.FAILED, F.LOG_RATIO}),
        "on_policy_distill": (on_policy(), Dense(teacher=teacher, divergence="reverse_kl"), BASE | SAMPLED | {F.TEACHER}),
        "on_policy_sampled_kl": (on_policy(), Dense(teacher=teacher, divergence="sampled_reverse_kl"),
                                 BASE | SAMPLED | {F.TEACHER_TOKEN_LOGP}),
        "gkd_on": (on_policy(probability=1.0), Dense(teacher=teacher, divergence="jsd"), BASE | SAMPLED | {F.TEACHER}),
        "gkd_off": (on_policy(probability=0.0), Dense(teacher=teacher, divergence="jsd"), BASE | {F.TEACHER, F.SAMPLED}),
    }


class BatchSpy(L.Callback):
    """Records the batch the training step saw (callbacks run in order; this one is asked
    after the step, when every field is in place)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(dict(batch))


NAMES = list(quadrants("unused"))


@pytest.mark.parametrize("name", NAMES)
def test_one_step_adds_exactly_the_fields_and_moves_every_parameter(name: str, teacher: str) -> None:
    data_source, signal, expected = quadrants(teacher)[name]
    module = tiny_module(data_source, signal)
    before = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    spy = BatchSpy()
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[spy]).fit(module, datamodule=tiny_datamodule())

    (batch,) = spy.batches
    assert set(batch) == expected
    rows, width = batch[F.RESPONSE_IDS].shape
    group = batch.get(F.GROUP_SIZE, 1)
    assert rows == 4 * group and len(batch[F.REFERENCES]) == rows
    for field in (F.BEHAVIOUR_LOGP, F.ADVANTAGES, F.TEACHER_TOKEN_LOGP, F.LOG_RATIO):
        if field in batch:
            assert batch[field].shape == (rows, width), field
    if F.TEACHER in batch:
        assert batch[F.TEACHER].hidden.shape[:2] == (rows, width)
    unchanged = [k for k, v in module.policy.named_parameters() if torch.equal(v.detach(), before[k])]
    assert not unchanged, f"{name}: parameters the step did not move: {unchanged}"


def test_mixed_source_samples_some_batches_and_keeps_data_for_others(teacher: str) -> None:
    module = tiny_module(on_policy(probability=0.5), Dense(teacher=teacher, divergence="jsd"))
    spy = BatchSpy()
    quiet_trainer(max_steps=12, limit_val_batches=0, callbacks=[spy]).fit(module, datamodule=tiny_datamodule())
    sampled = [F.BEHAVIOUR_LOGP in b for b in spy.batches]
    assert 0 < sum(sampled) < len(sampled), sampled

