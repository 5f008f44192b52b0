"""The training model's own Hugging Face ``generate``: no second copy of the weights and
nothing to sync, at the speed of a training framework's decoding loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightning_unified.engines.base import GenerationRequest, Rollout, RolloutEngine, mask_after_stop


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


class HFEngine(RolloutEngine):
    shares_weights = True

    def start(self, policy: nn.Module) -> None:
        pass

    @torch.no_grad()
    def generate(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 request: GenerationRequest) -> Rollout:
        recorder = BehaviourLogProbs() if not request.greedy else None
        processors = LogitsProcessorList()
        if recorder is not None:
            if request.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(request.temperature))
            if request.behaviour == "tempered":
                processors.append(recorder)  # before truncation: the tempered distribution
            if request.top_k:
                processors.append(TopKLogitsWarper(request.top_k))
            if request.top_p < 1.0:
                processors.append(TopPLogitsWarper(request.top_p))
            if request.behaviour == "sampled":
                processors.append(recorder)  # after truncation: what was actually sampled from
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        was_training = policy.training
        policy.eval()
        try:
            # the draws depend on the request's seed only, whatever else used the global RNG
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(request.seed)
                sequences = policy.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=not request.greedy,
                    # the warpers above replace generate's own, so the recorder sees their output
                    temperature=1.0, top_k=0, top_p=1.0, logits_processor=processors,
                    max_new_tokens=request.max_new_tokens, pad_token_id=request.pad_token_id,
                    eos_token_id=list(request.stop_token_ids), use_cache=True,
                    # sharded strategies hang unless every rank runs the same number of forwards
                    synced_gpus=request.synced,
                )
        finally:
            policy.train(was_training)
        response_ids = sequences[:, prompt_ids.shape[1]:]
        mask = mask_after_stop(response_ids, request.stop_token_ids)
        logp = None if recorder is None else torch.where(mask.bool(), recorder.finish(sequences), 0.0)
        return Rollout(torch.where(mask.bool(), response_ids, request.pad_token_id), mask, logp)
