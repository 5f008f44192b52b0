"""The sample stage: on-policy responses, G per prompt from the current policy, through the run's
rollout engine (:mod:`lightning_unified.engines`), and record the behaviour log-probs of the
distribution sampled from."""

from __future__ import annotations

import random
import time

import lightning as L
import torch

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.specs import OnPolicy
from lightning_unified.stages.base import Stage


def mixed_batch_is_on_policy(probability: float, seed: int, global_step: int, batch_idx: int) -> bool:
    """The same draw on every rank, and again after a resume: it depends only on the seed
    and the step, not on any rank's RNG state."""
    if probability >= 1.0:
        return True
    if probability <= 0.0:
        return False
    return random.Random(f"{seed}:{global_step}:{batch_idx}").random() < probability


def sampling_seed(seed: int, global_step: int, batch_idx: int, rank: int) -> int:
    return random.Random(f"sample:{seed}:{global_step}:{batch_idx}:{rank}").getrandbits(63)


class SampleStage(Stage):
    name = "sample"

    def __init__(self, data_source: OnPolicy):
        super().__init__()
        self.data_source = data_source

    def reads(self) -> set[str]:
        return {fields.PROMPT_IDS, fields.PROMPT_MASK}

    def writes(self) -> set[str]:
        # the prompts (and their per-row lists) come back as G copies each
        return {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK, fields.LOSS_MASK,
                fields.BEHAVIOUR_LOGP, fields.GROUP_SIZE, fields.POLICY_VERSION, fields.SAMPLED, fields.REFERENCES,
                fields.PROMPTS, fields.TEACHER_NAMES, fields.TEACHER_PROMPTS}

    def _max_new_tokens(self, pl_module: L.LightningModule) -> int:
        """The sampling spec's, else the module's (which falls back to the datamodule's)."""
        return self.data_source.sampling.max_new_tokens or pl_module.max_new_tokens

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        on_policy = mixed_batch_is_on_policy(
            self.data_source.probability, self.data_source.seed, trainer.global_step, batch_idx
        )
        if self.data_source.probability < 1.0:
            pl_module.log("sampling/on_policy", float(on_policy), batch_size=1)
        batch[fields.SAMPLED] = on_policy
        if not on_policy:
            fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                           who="a mixed data source's off-policy batch")
            return
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="sampling")
        # the draws depend on (seed, step, batch, rank) only: a resumed run samples exactly
        # what the uninterrupted one did, whatever else used the global RNG before
        seed = sampling_seed(self.data_source.seed, trainer.global_step, batch_idx, trainer.global_rank)
        step = pl_module.progress["optimizer_steps"]
        # the engine rests again after the block: its memory is the training step's until the next rollout
        with pl_module.rollouts.engine_for(step) as engine, trainer_precision(pl_module):
            sync_seconds = pl_module.rollouts.take_sync_seconds()  # started and synced: what follows is generation
            if sync_seconds is not None:
                pl_module.log("sampling/sync_seconds", sync_seconds, batch_size=1)
            started = time.perf_counter()
            self._sample(engine, batch, pl_module, self._max_new_tokens(pl_module), synced=trainer.world_size > 1,
                         seed=seed)
            seconds = time.perf_counter() - started
        # the weights that sampled: older than the policy's when the engine syncs every few steps
        version = pl_module.rollouts.weights_version(step)
        batch[fields.POLICY_VERSION] = [version] * batch[fields.RESPONSE_IDS].shape[0]
        pl_module.log("sampling/staleness", step - version, batch_size=1)
        lengths = batch[fields.RESPONSE_MASK].sum(-1).float()
        stops = torch.as_tensor(pl_module.stop_token_ids, device=lengths.device)
        ended = torch.isin(batch[fields.RESPONSE_IDS], stops).any(-1).float()
        n = lengths.numel()
        pl_module.log("sampling/response_length", lengths.mean(), batch_size=n)
        pl_module.log("sampling/eos_fraction", ended.mean(), batch_size=n)
        pl_module.log("sampling/tokens_per_sec", lengths.sum() / seconds, batch_size=1)

    def sample_into(self, batch: dict, pl_module: L.LightningModule, max_new_tokens: int, synced: bool,
                    seed: int = 0) -> None:
        """Replace the batch's prompts by G copies each and add their sampled responses,
        from the module's rollout engine (synced with the policy first, when due)."""
        with pl_module.rollouts.engine_for(pl_module.progress["optimizer_steps"]) as engine:
            self._sample(engine, batch, pl_module, max_new_tokens, synced, seed)

    @torch.no_grad()
    def _sample(self, engine, batch: dict, pl_module: L.LightningModule, max_new_tokens: int, synced: bool,
                seed: int) -> None:
        spec = self.data_source.sampling
        group = spec.num_generations
        prompt_ids = batch[fields.PROMPT_IDS].repeat_interleave(group, dim=0)
        prompt_mask = batch[fields.PROMPT_MASK].repeat_interleave(group, dim=0)
        request = GenerationRequest(
            max_new_tokens=max_new_tokens, stop_token_ids=tuple(pl_module.stop_token_ids),
            pad_token_id=pl_module.tokenizer.pad_token_id, temperature=spec.temperature, top_k=spec.top_k,
            top_p=spec.top_p, behaviour=spec.behaviour, seed=seed, synced=synced,
        )
        rollout = engine.generate(pl_module.policy, prompt_ids, prompt_mask, request)
        batch[fields.PROMPT_IDS] = prompt_ids
        batch[fields.PROMPT_MASK] = prompt_mask
        batch[fields.RESPONSE_IDS] = rollout.response_ids
        batch[fields.RESPONSE_MASK] = rollout.response_mask
        batch[fields.LOSS_MASK] = rollout.response_mask  # one sampled turn: every token is the policy's
        batch[fields.BEHAVIOUR_LOGP] = rollout.logp
        batch[fields.GROUP_SIZE] = group
        for name in (fields.REFERENCES, fields.PROMPTS, fields.TEACHER_NAMES, fields.TEACHER_PROMPTS):  # per-prompt lists, now one entry per row
            if name in batch:
                batch[name] = [value for value in batch[name] for _ in range(group)]
