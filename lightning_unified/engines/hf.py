"""Hugging Face ``generate``, at the speed of a training framework's decoding loop: by
default the training model's own (no second copy of the weights and nothing to sync); with
``copy=True`` a plain model of its own, synced like any engine, so that it can sample in a
thread beside the training step (``sampling.max_lag``) from weights the trainer is no
longer changing. Either way it samples from the request's settings alone: the checkpoint's
own ``generation_config`` (:mod:`~lightning_unified.engines.plain_generation`) never runs."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightning_unified.engines.base import GenerationRequest, Rollout, RolloutEngine, mask_after_stop
from lightning_unified.engines import adapters
from lightning_unified.engines.parameter_copy import base_model, engine_weights, materialise
from lightning_unified.engines.plain_generation import checkpoint_settings_off, say_ignored_once
from lightning_unified.losses.objective import target_logprobs
from lightning_unified.models.forward import response_hidden


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


class PrivateDraw(LogitsProcessor):
    """Draws each next token from the processed distribution with a generator of its own,
    seeded by the request, and hands generate scores whose argmax is that token. Sampling
    never touches torch's global RNG: a producer thread may sample while the training step
    uses it (dropout), and the draws depend on the request's seed alone."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.generator is None:  # on the scores' device, known at the first step
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        token = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


class StopWhenCancelled(StoppingCriteria):
    """Ends every row once ``event`` is set: the producer that asked is being stopped."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class HFEngine(RolloutEngine):
    """``copy``: generate from a plain model of its own (built from the policy's config,
    loaded with its weights at every sync: LoRA merged, FSDP2 shards gathered) instead of
    the training model. The copy is whole and unsharded on every rank, beside the policy
    on its device: under FSDP2 each rank holds the full weights once more (a sharded copy
    would run collectives from the producer's thread, beside the training step's)."""

    copy = False
    model: nn.Module | None = None
    #: the copy is a peft model whose base was copied once: each sync copies the adapters alone
    adapter_only = False

    def __init__(self, copy: bool = False):
        self.copy = copy

    @property
    def shares_weights(self) -> bool:  # type: ignore[override]
        return not self.copy

    def start(self, policy: nn.Module, version: int = 0) -> None:
        if self.copy:
            # in the trainer's compute dtype (bf16 under bf16-mixed): the copy only samples and
            # scores, and a float32 replica would hold the policy's whole weights again at twice the size
            self.model = empty_copy(policy, self.compute_dtype)
            # a LoRA policy whose adapters alone train: its base once (unmerged), the copy a
            # peft model of the same adapters, and each sync the adapters alone
            self.adapter_only = adapters.adapters_alone_train(policy)
            self.sync_bytes = self._copy_weights(policy, merge=not self.adapter_only)
            if self.adapter_only:
                self.model = adapters.peft_copy(policy, self.model)
                self.sync_bytes += self._copy_adapters(policy)

    def sync(self, policy: nn.Module, version: int = 0) -> None:
        if not self.copy:
            return
        self.sync_bytes = self._copy_adapters(policy) if self.adapter_only else self._copy_weights(policy)

    @torch.no_grad()
    def _copy_weights(self, policy: nn.Module, merge: bool = True) -> int:
        """The policy's whole weights (LoRA merged, unless ``merge`` is off) into the plain copy."""
        with engine_weights(policy, merge=merge) as weights:
            own = self.model.state_dict()
            copied, moved = set(), 0
            for name, tensor in weights:  # one at a time: no second whole copy of the policy
                if name in own:
                    own[name].copy_(tensor)
                    copied.add(name)
                    moved += own[name].numel() * own[name].element_size()
            missing = sorted(set(own) - copied)
            if missing:
                raise RuntimeError(f"sampling.engine=hf with max_lag: the policy's weights lack {missing[:5]} "
                                   f"that its config's model has")
        return moved

    @torch.no_grad()
    def _copy_adapters(self, policy: nn.Module) -> int:
        """The policy's adapter tensors into the peft copy's, one at a time (each FSDP2 shard
        gathered in turn), under the same state-dict names."""
        own, moved = self.model.state_dict(keep_vars=True), 0
        for name, tensor in adapters.adapter_parameters(policy):
            if name not in own:
                raise RuntimeError(f"sampling.engine=hf with max_lag: the copy has no adapter tensor {name!r}")
            own[name].copy_(materialise(tensor))
            moved += own[name].numel() * own[name].element_size()
        return moved

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def token_logp(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float) -> Tensor | None:
        if not self.copy:
            return None  # the training model itself: the trainer's own log-probs
        hidden = response_hidden(self.model, prompt_ids, prompt_mask, response_ids, response_mask)
        # the trainer's chunked pass over the head: a stale batch's [B, R, V] logits
        # (40 GB in float32 at 64 rows x 1,024 tokens x 152k) are never held at once
        head = self.model.get_output_embeddings()
        logp = target_logprobs(hidden, head.weight, response_ids, head_bias=head.bias, temperature=temperature)
        return torch.where(response_mask.bool(), logp, 0.0)

    @torch.no_grad()
    def generate(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 request: GenerationRequest) -> Rollout:
        say_ignored_once(policy, request.stop_token_ids)
        if self.copy:
            # the plain copy runs no collectives: each rank generates on its own
            policy, request = self.model, dataclasses.replace(request, synced=False)
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
            # the draw itself, from the request's seed: generate then picks the drawn token greedily
            processors.append(PrivateDraw(request.seed))
        # the request's settings, in a config of their own: the processors above replace
        # generate's own warpers and sampling, and nothing of the checkpoint's is added
        settings = GenerationConfig(do_sample=False, max_new_tokens=request.max_new_tokens,
                                    pad_token_id=request.pad_token_id, eos_token_id=list(request.stop_token_ids),
                                    use_cache=True)
        # a producer being stopped ends the generation at the next token (its rows are dropped)
        stopping = StoppingCriteriaList([StopWhenCancelled(request.cancelled)]) if request.cancelled is not None else None
        was_training = policy.training
        policy.eval()
        try:
            with checkpoint_settings_off(policy):
                sequences = policy.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=settings,
                    logits_processor=processors, stopping_criteria=stopping,
                    # sharded strategies hang unless every rank runs the same number of forwards
                    synced_gpus=request.synced,
                )
        finally:
            policy.train(was_training)
        response_ids = sequences[:, prompt_ids.shape[1]:]
        mask = mask_after_stop(response_ids, request.stop_token_ids)
        logp = None if recorder is None else torch.where(mask.bool(), recorder.finish(sequences), 0.0)
        return Rollout(torch.where(mask.bool(), response_ids, request.pad_token_id), mask, logp)


def empty_copy(policy: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model of the policy's architecture in ``dtype`` (None: the policy's) on the policy's device, its
    parameters allocated but not initialised: built on the meta device and then given
    memory, so no random initialisation runs (the sync overwrites every weight) and
    nothing is allocated twice (first on the CPU, then on the GPU). The sync fills the weights; the
    buffers no state dict carries (the rotary embedding's frequencies) are the policy's."""
    source = base_model(policy)
    config = source.config.__class__.from_dict(source.config.to_dict())
    parameter = next(source.parameters())
    device = parameter.device if parameter.device.type != "meta" else torch.device("cpu")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or parameter.dtype)
    _give_memory(model, device)
    given = dict(source.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in given:
                raise RuntimeError(f"sampling.engine=hf with max_lag: the policy has no buffer {name!r} that its "
                                   f"config's model has")
            buffer.copy_(given[name])
    model.requires_grad_(False)
    return model.eval()


def _give_memory(model: nn.Module, device: torch.device) -> None:
    """Uninitialised memory on ``device`` for every meta tensor of ``model``, once per tensor:
    ``Module.to_empty`` gives a tied weight (the embedding and the head) one tensor per
    module that holds it, twice the memory until it is tied again."""
    made: dict[int, tuple[Tensor, Tensor]] = {}  # id of the meta tensor: (it, its replacement)
    for module in model.modules():
        for slots, as_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in list(slots.items()):
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    empty = torch.empty_like(tensor, device=device)
                    made[id(tensor)] = (tensor, nn.Parameter(empty, requires_grad=False) if as_parameter else empty)
                slots[name] = made[id(tensor)][1]
