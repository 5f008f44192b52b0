"""On-policy responses: sample G per prompt from the current policy and record the
behaviour log-probs of the distribution actually sampled from."""

from __future__ import annotations

import random

import lightning as L
import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.specs import OnPolicy


class BehaviourLogProbs(LogitsProcessor):
    """A logits processor that keeps log mu(. | context) of the current step only, and
    gathers the previous step's at the token that was then sampled (it is the newest
    token of ``input_ids``), without holding a [B, T, V] tensor of scores. Placed after the
    temperature, it records the tempered distribution; placed last, the truncated one."""

    def __init__(self) -> None:
        self.pending: Tensor | None = None
        self.recorded: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self.recorded.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """[B, R] log-probs of the R generated tokens at the end of ``sequences``."""
        if self.pending is not None:
            self.recorded.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
        out = torch.stack(self.recorded, dim=1)
        self.pending, self.recorded = None, []
        return out


def response_mask_until_eos(response_ids: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """1 up to and including the first stop token (EOS, or any of a list), 0 after it
    (generate pads finished rows), [B, R]."""
    stops = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, stops).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


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


class SamplingCallback(L.Callback):
    def __init__(self, data_source: OnPolicy):
        self.data_source = data_source

    def _max_new_tokens(self, pl_module: L.LightningModule) -> int:
        """The sampling spec's, else the module's (which falls back to the datamodule's)."""
        return self.data_source.sampling.max_new_tokens or pl_module.max_new_tokens

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        on_policy = mixed_batch_is_on_policy(
            self.data_source.probability, self.data_source.seed, trainer.global_step, batch_idx
        )
        if self.data_source.probability < 1.0:
            pl_module.log("sampling/on_policy", float(on_policy), batch_size=1)
        if not on_policy:
            fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                           who="a mixed data source's off-policy batch")
            return
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="sampling")
        # the draws depend on (seed, step, batch, rank) only: a resumed run samples exactly
        # what the uninterrupted one did, whatever else used the global RNG before
        seed = sampling_seed(self.data_source.seed, trainer.global_step, batch_idx, trainer.global_rank)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), trainer_precision(pl_module):
            torch.manual_seed(seed)
            self.sample_into(batch, pl_module, self._max_new_tokens(pl_module), synced=trainer.world_size > 1)
        lengths = batch[fields.RESPONSE_MASK].sum(-1).float()
        stops = torch.as_tensor(pl_module.stop_token_ids, device=lengths.device)
        ended = torch.isin(batch[fields.RESPONSE_IDS], stops).any(-1).float()
        n = lengths.numel()
        pl_module.log("sampling/response_length", lengths.mean(), batch_size=n)
        pl_module.log("sampling/eos_fraction", ended.mean(), batch_size=n)

    @torch.no_grad()
    def sample_into(self, batch: dict, pl_module: L.LightningModule, max_new_tokens: int, synced: bool) -> None:
        spec = self.data_source.sampling
        group = spec.num_generations
        tokenizer, policy = pl_module.tokenizer, pl_module.policy
        prompt_ids = batch[fields.PROMPT_IDS].repeat_interleave(group, dim=0)
        prompt_mask = batch[fields.PROMPT_MASK].repeat_interleave(group, dim=0)
        recorder = BehaviourLogProbs()
        processors = LogitsProcessorList()
        if spec.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(spec.temperature))
        if spec.behaviour == "tempered":
            processors.append(recorder)  # before truncation: the tempered distribution
        if spec.top_k:
            processors.append(TopKLogitsWarper(spec.top_k))
        if spec.top_p < 1.0:
            processors.append(TopPLogitsWarper(spec.top_p))
        if spec.behaviour == "sampled":
            processors.append(recorder)  # after truncation: what was actually sampled from
        was_training = policy.training
        policy.eval()
        try:
            sequences = policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                # the warpers above replace generate's own, so the recorder sees their output
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                logits_processor=processors,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=pl_module.stop_token_ids,
                use_cache=True,
                # sharded strategies hang unless every rank runs the same number of forwards
                synced_gpus=synced,
            )
        finally:
            policy.train(was_training)
        response_ids = sequences[:, prompt_ids.shape[1]:]
        mask = response_mask_until_eos(response_ids, pl_module.stop_token_ids)
        behaviour = recorder.finish(sequences)
        batch[fields.PROMPT_IDS] = prompt_ids
        batch[fields.PROMPT_MASK] = prompt_mask
        batch[fields.RESPONSE_IDS] = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
        batch[fields.RESPONSE_MASK] = mask
        batch[fields.BEHAVIOUR_LOGP] = torch.where(mask.bool(), behaviour, 0.0)
        batch[fields.GROUP_SIZE] = group
        for name in (fields.REFERENCES, fields.PROMPTS):  # per-prompt lists, now one entry per row
            if name in batch:
                batch[name] = [value for value in batch[name] for _ in range(group)]
