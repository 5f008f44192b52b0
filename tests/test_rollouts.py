"""The rollout engine's one owner: it starts the engine on first use, syncs it on schedule,
puts it to sleep after every rollout and after validation (not after each validation
batch), wakes its weights before a sync and the rest after it, knows which weights it
holds, and closes it; the stages and validation all ask it."""

from __future__ import annotations

from lightning_unified.engines.hf import HFEngine
from lightning_unified.rollouts import Rollouts
from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
from tests.lightning_helpers import quiet_trainer, tiny_datamodule, tiny_module


class RecordingEngine(HFEngine):
    """The policy's own ``generate``, but an engine with weights of its own as far as the
    owner can tell: every start, sync, sleep, wake and close is recorded."""

    shares_weights = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, policy, version: int = 0) -> None:
        self.calls.append("start")

    def sync(self, policy, version: int = 0) -> None:
        self.calls.append("sync")

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_weights(self) -> None:
        self.calls.append("wake_weights")

    def wake(self) -> None:
        self.calls.append("wake")

    def close(self) -> None:
        self.calls.append("close")

    def generate(self, policy, prompt_ids, prompt_mask, request):
        self.calls.append("generate")
        return super().generate(policy, prompt_ids, prompt_mask, request)


def test_the_owner_starts_syncs_rests_and_closes_on_schedule() -> None:
    engine = RecordingEngine()
    rollouts = Rollouts(policy=None, sync_every=2)
    rollouts.engine = engine
    with rollouts.engine_for(0):
        with rollouts.engine_for(0):  # nested: the engine rests when the outer block ends
            pass
        assert engine.calls == ["start"]
    assert rollouts.take_sync_seconds() is not None and rollouts.take_sync_seconds() is None
    with rollouts.engine_for(1):
        assert rollouts.weights_version(1) == 0, "synced every 2 steps: still step 0's weights"
    with rollouts.engine_for(2):
        assert rollouts.weights_version(2) == 2
    rollouts.close()
    assert engine.calls == ["start", "sleep", "wake_weights", "wake", "sleep", "wake_weights", "sync", "wake", "sleep",
                            "close"]


def test_sampling_and_validation_go_through_the_owner() -> None:
    module = tiny_module(OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=3)),
                         Sparse(rewards=[Reward(digit_match)]))
    engine = module.rollouts.engine = RecordingEngine()
    data = tiny_datamodule(batch_size=4)  # 8 held-out prompts: validation is 1 batch of 8
    data.hparams.val_batch_size = 4  # 2 validation batches
    quiet_trainer(max_steps=2, val_check_interval=2, num_sanity_val_steps=0).fit(module, datamodule=data)
    # each training batch: woken (its weights, synced after an update, then the rest) for its
    # one rollout, then asleep; validation: awake for both its batches, asleep after the epoch
    assert engine.calls == ["start", "generate", "sleep",
                            "wake_weights", "sync", "wake", "generate", "sleep",
                            "wake_weights", "sync", "wake", "generate", "generate", "sleep"]
