"""A divergence, an advantage estimator and an importance ratio registered from outside the
package: one function and one registration each, and a run uses them by name. A divergence
says what it needs from the teacher, and the teacher stage asks for exactly that."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.losses import weight_builders
from lightning_unified.losses.token_weights import TokenWeights
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.registry import (ADVANTAGES, DIVERGENCES, RATIOS, register_advantage, register_divergence,
                                        register_ratio)
from lightning_unified.specs import Dense, Importance, OffPolicy, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.stages.advantages import estimate_advantages
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.tasks.addition import digit_match
from tests.lightning_helpers import TINY, quiet_trainer, save_tiny_teacher, tiny_datamodule


def doubled_forward_kl(student_logp, targets, teacher_logp) -> TokenWeights:
    """2 KL(teacher || student): twice forward KL's weights and objective."""
    half = weight_builders.forward_kl(student_logp, targets, teacher_logp)
    return TokenWeights(dense=2 * half.dense, objective=2 * half.objective, dense_total=2 * half.dense_total)


def halved_sampled_reverse_kl(student_logp, targets, teacher_token_logp) -> TokenWeights:
    half = weight_builders.sampled_reverse_kl(student_logp, targets, teacher_token_logp)
    return TokenWeights(coef=half.coef / 2, objective=half.objective / 2)


def best_of_group(rewards, *, group_size: int, eps: float):
    """1 for each prompt's best sample, 0 for the others."""
    groups = rewards.reshape(-1, group_size)
    return (groups == groups.max(-1, keepdim=True).values).to(rewards.dtype).reshape(-1)


def untruncated(importance):
    return weight_builders.importance_weighted_advantage, {}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """One registration each, as a user's module makes them on import; here for this
    module's tests only (the registries are the process's, and a worker runs other files)."""
    register_divergence("doubled_forward_kl", needs="distribution")(doubled_forward_kl)
    register_divergence("halved_sampled_reverse_kl", needs="token_logp")(halved_sampled_reverse_kl)
    register_advantage("best_of_group")(best_of_group)
    register_ratio("untruncated")(untruncated)
    yield
    for registry, name in ((DIVERGENCES, "doubled_forward_kl"), (DIVERGENCES, "halved_sampled_reverse_kl"),
                           (ADVANTAGES, "best_of_group"), (RATIOS, "untruncated")):
        registry.remove(name)


def sgd_step(signal, teacher: str | None = None) -> dict[str, torch.Tensor]:
    """One SGD step's parameter change of a fresh tiny policy on the same batch."""
    data = tiny_datamodule(batch_size=4)
    module = UnifiedModule(build_policy(data.tokenizer, config=TINY, seed=0), data.tokenizer, OffPolicy(), signal,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    torch.manual_seed(0)
    quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    return {n: p.detach() - before[n] for n, p in module.policy.named_parameters()}


def test_a_divergence_registered_outside_the_package_trains(tmp_path) -> None:
    teacher = save_tiny_teacher(tmp_path / "teacher")
    doubled = sgd_step(Dense(teacher=teacher, divergence="doubled_forward_kl"))
    single = sgd_step(Dense(teacher=teacher, divergence="forward_kl"))
    for name, change in doubled.items():
        torch.testing.assert_close(change, 2 * single[name], rtol=1e-4, atol=1e-6)  # float32 steps
    assert any(change.abs().max() > 0 for change in single.values())


def test_a_divergence_says_what_it_needs_from_the_teacher() -> None:
    signal = Dense(teacher="t", divergence="halved_sampled_reverse_kl")
    assert signal.teacher_gives == "token_logp" and TeacherStage(signal).writes() == {F.TEACHER_TOKEN_LOGP}
    # a served teacher gives token log-probs: enough for it, not for a whole-distribution divergence
    Dense(divergence="halved_sampled_reverse_kl", engine="server", url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"not its whole distribution, which signal.divergence='doubled_forward_kl'"):
        Dense(divergence="doubled_forward_kl", engine="server", url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"signal.top_k=4 gives the teacher's top-k, from which "
                                         r"signal.divergence='doubled_forward_kl' cannot run"):
        Dense(teacher="t", divergence="doubled_forward_kl", top_k=4)
    with pytest.raises(ValueError, match=r"signal.divergence must be one of \(.*'doubled_forward_kl'.*\), got 'kl'"):
        Dense(teacher="t", divergence="kl")


def test_an_advantage_estimator_and_a_ratio_registered_outside_the_package() -> None:
    rewards = torch.tensor([0.0, 1.0, 2.0, 2.0])
    assert estimate_advantages(rewards, "best_of_group", group_size=2).tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="best_of_group.*compares responses to the same prompt"):
        estimate_advantages(rewards, "best_of_group", group_size=1)
    data = tiny_datamodule(batch_size=4)
    spec = OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio="untruncated"))
    module = UnifiedModule(build_policy(data.tokenizer, config=TINY), data.tokenizer, spec,
                           Sparse(rewards=[Reward(digit_match)], advantage="best_of_group"))
    seen = []

    class Spy(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(batch[F.ADVANTAGES][:, 0].clone())

    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Spy()]).fit(module, datamodule=data)
    assert set(seen[0].tolist()) <= {0.0, 1.0}, "the registered estimator made the advantages"
