"""The batch pipeline as stages in a declared order: a stage of the user's joins it by name,
from the command line or in Python, and runs where it asked; a stage out of order, or one
reading what nothing writes, is refused before any model loads, naming both stages."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.config import build_run, train
from lightning_unified.losses.advantages import grpo_advantages
from lightning_unified.module import UnifiedModule
from lightning_unified.models.loading import build_policy
from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
from lightning_unified.stages import PipelineError, Stage
from lightning_unified.tasks.addition import digit_match
from tests.lightning_helpers import FAST_TASK, TINY, compose_config, quiet_trainer, tiny_datamodule

# what SeesSamples found in each batch it ran on (the run is in this process)
SEEN: list[set[str]] = []


class SeesSamples(Stage):
    """A scorer of the user's between sampling and rewards: it reads the samples and writes
    a field of its own."""

    name = "sees_samples"

    def reads(self) -> set[str]:
        return {F.RESPONSE_IDS, F.BEHAVIOUR_LOGP}

    def writes(self) -> set[str]:
        return {"response_lengths"}

    def run(self, trainer, host, batch, batch_idx) -> None:
        SEEN.append(set(batch))
        batch["response_lengths"] = batch[F.RESPONSE_MASK].sum(-1)


class Shaping(Stage):
    """Reward shaping between rewards and advantages: each prompt's first sample gets 1."""

    name = "shaping"

    def reads(self) -> set[str]:
        return {F.REWARDS}

    def writes(self) -> set[str]:
        return {F.REWARDS}

    def run(self, trainer, host, batch, batch_idx) -> None:
        group = batch[F.GROUP_SIZE]
        batch[F.REWARDS] = (torch.arange(batch[F.REWARDS].numel(), device=batch[F.REWARDS].device) % group == 0).float()


RL = ["experiment=rl", *FAST_TASK, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "save_policy=null",
      "validate_first=false", "trainer.val_check_interval=2", "data_source.sampling.num_generations=2"]


def test_a_stage_from_the_command_line_runs_between_sampling_and_rewards(tmp_path) -> None:
    SEEN.clear()
    cfg = compose_config([*RL, "module.stages=[{_target_: tests.test_stages.SeesSamples, after: sample}]"])
    run = build_run(cfg, tmp_path / "built")
    assert run.module.pipeline.names == ["sample", "sees_samples", "rewards", "advantages", "importance"]
    train(cfg, tmp_path / "run")
    assert len(SEEN) == 2, "one run per training batch"
    for seen in SEEN:
        assert {F.RESPONSE_IDS, F.BEHAVIOUR_LOGP, F.POLICY_VERSION} <= seen, "it sees the samples"
        assert not seen & {F.REWARDS, F.ADVANTAGES}, "rewards come after it"


def test_a_stage_in_python_shapes_rewards_before_the_advantages() -> None:
    data = tiny_datamodule(batch_size=4)
    module = UnifiedModule(build_policy(data.tokenizer, config=TINY), data.tokenizer,
                           OnPolicy(sampling=Sampling(num_generations=2)), Sparse(rewards=[Reward(digit_match)]),
                           stages=[Shaping(before="advantages")])
    assert module.pipeline.names == ["sample", "rewards", "shaping", "advantages", "importance"]
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append((batch[F.REWARDS].clone(), batch[F.ADVANTAGES][:, 0].clone()))

    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[Spy()]).fit(module, datamodule=data)
    rewards, advantages = seen[0]
    assert rewards.tolist() == [1.0, 0.0] * 4
    torch.testing.assert_close(advantages, grpo_advantages(rewards, group_size=2))


@pytest.mark.parametrize("stage,message", [
    ("{_target_: tests.test_stages.Shaping, after: sample}",
     r"stage 'shaping' reads 'rewards', which stage 'rewards' writes after it: place 'shaping' after 'rewards'"),
    ("{_target_: tests.test_stages.SeesSamples, before: sample}",
     r"stage 'sees_samples' reads 'behaviour_logp', which stage 'sample' writes after it"),
    ("{_target_: tests.test_stages.SeesSamples, after: smaple}",
     r"module.stages\[0\] \(SeesSamples\) goes after 'smaple', which this method's pipeline does not have; its "
     r"stages are \['sample', 'rewards', 'advantages', 'importance'\]"),
    ("{_target_: tests.test_stages.SeesSamples, name: rewards, after: sample}",
     r"module.stages\[0\] \(SeesSamples\) is named 'rewards', like a stage already in the pipeline"),
])
def test_a_stage_out_of_order_is_refused_before_any_model_loads(stage: str, message: str, tmp_path) -> None:
    # the policy's directory does not exist: the pipeline is refused before anything tries to load it
    cfg = compose_config([*RL, f"model.path={tmp_path / 'no_model'}", f"module.stages=[{stage}]"])
    with pytest.raises(PipelineError, match=message):
        build_run(cfg, tmp_path / "run")


def test_a_field_nothing_writes_and_a_stage_that_is_not_one_are_named() -> None:
    data = tiny_datamodule()
    policy = build_policy(data.tokenizer, config=TINY)
    with pytest.raises(PipelineError, match=r"stage 'sees_samples' reads 'behaviour_logp', which neither the data nor "
                                            r"a stage before it writes"):
        from lightning_unified.specs import OffPolicy

        UnifiedModule(policy, data.tokenizer, OffPolicy(), Sparse(), stages=[SeesSamples()])
    with pytest.raises(TypeError, match=r"module.stages\[0\] must be a lightning_unified.stages.Stage, got function"):
        UnifiedModule(policy, data.tokenizer, OnPolicy(sampling=Sampling(num_generations=2)),
                      Sparse(rewards=[Reward(digit_match)]), stages=[digit_match])
    with pytest.raises(ValueError, match="goes before 'rewards' or after 'sample', not both"):
        Shaping(before="rewards", after="sample")
