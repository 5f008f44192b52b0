"""The rollout engine interface: token ids in, token ids and their log-probs out.

Engines know nothing of Lightning: the sample stage and the module's validation hand
them tensors, the policy, and the settings of one request (:class:`GenerationRequest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: ``greedy`` (validation) or sampled at ``temperature`` with
    ``top_k`` (0: off) and ``top_p`` (1: off); ``behaviour`` says which distribution's
    log-probs come back (``tempered``: before truncation; ``sampled``: the truncated one)."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    behaviour: str = "tempered"
    # the draws depend on this seed only (an engine may derive one per row from it)
    seed: int = 0
    # every rank runs the same number of forwards (sharded strategies hang otherwise)
    synced: bool = False
    # a threading.Event: set, the generation may end early (its producer is being stopped);
    # the rows it returns are then dropped. Not compared: two requests differing only in it
    # ask for the same tokens
    cancelled: Any = field(default=None, compare=False)


@dataclass
class Rollout:
    """Generated responses, right-padded with the pad token after their stop token."""

    response_ids: Tensor  # [B, R] long
    response_mask: Tensor  # [B, R] long, 1 up to and including the stop token
    logp: Tensor | None  # [B, R] float, log mu(y_t) of the request's distribution (0 on padding); None when greedy
    # [B, R] long, the weights version that sampled each token (a served engine's, whose weights
    # may change within a row); None: every token of the rollout from the engine's one version
    versions: Tensor | None = None


class RolloutEngine:
    """Generates from the policy's current weights.

    ``start`` is called once, on the first request; ``sync`` whenever the policy has been
    updated since the engine last saw it (engines that read the training model directly
    need nothing). ``sleep`` frees the engine's memory around the training step, where the
    device supports it; ``wake_weights``, a sync if due (always, where sleeping forgot the
    weights), then ``wake`` restore it.
    """

    #: True when the engine reads the training model's weights directly (nothing to sync)
    shares_weights = False
    #: True when the run scores prompts through the engine (the self-teacher of
    #: ``teacher.engine=vllm``), set by the module at setup: vLLM cannot score prompt tokens
    #: under a LoRA adapter (vllm-project/vllm#16668), so such an engine takes merged weights
    scores_prompts = False
    #: the run's directory, set at setup: where an engine writes what it makes (logs)
    run_dir: Path | None = None
    #: the bytes the last start or sync moved into the engine (None: it moves none): the whole
    #: model, or with a LoRA policy whose adapters alone train, the adapters after the first
    sync_bytes: int | None = None
    #: the dtype the trainer computes in (bf16 under ``bf16-mixed``), set by the module before
    #: the engine starts: an engine with weights of its own runs in it, not in the float32 of
    #: the master weights it is synced from (None: the policy's parameters' dtype)
    compute_dtype: torch.dtype | None = None

    def start(self, policy: nn.Module, version: int = 0) -> None:
        """Start with the policy's current weights; ``version`` is the optimizer step they are
        from (a resumed run's, for the versions a served engine's tokens report)."""
        raise NotImplementedError

    def generate(self, policy: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 request: GenerationRequest) -> Rollout:
        """Responses to the left-padded prompts ``prompt_ids`` [B, P] (``prompt_mask`` 1 on
        real tokens), one per row."""
        raise NotImplementedError

    def sync(self, policy: nn.Module, version: int = 0) -> None:
        """Load the policy's current weights into the engine; ``version`` is the optimizer
        step they are from (what a served engine's tokens report)."""

    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              top_k: int):
        """The engine's log-prob of each given response token and, with ``top_k``, its top-k
        at each response position (a :class:`~lightning_unified.teachers.TeacherScores`):
        how self-distillation's teacher is scored by the rollout engine. Engines that read
        the training model directly leave it to a forward of that model."""
        raise NotImplementedError(f"{type(self).__name__} does not score given responses")

    def token_logp(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float) -> Tensor | None:
        """The engine's log-prob of each given response token at ``temperature`` [B, R] (0 on
        padding), from the weights it holds now; None where it cannot say. How the lag's
        share of the importance ratio is told apart from the engine's mismatch."""
        return None

    #: True when :meth:`sleep` discards the weights (vLLM's level 2): the owner loads the
    #: policy's weights again at every wake
    forgets_weights_asleep = False

    def sleep(self) -> None:
        """Free the engine's memory until :meth:`wake_weights` and :meth:`wake` (a no-op where
        unsupported)."""

    def wake_weights(self) -> None:
        """Give the weights their memory back, first: a sync then fills it before :meth:`wake`
        gives back the rest (the KV cache)."""

    def wake(self) -> None:
        """Undo the rest of :meth:`sleep`."""

    def close(self) -> None:
        """Release everything the engine holds."""


def mask_after_stop(response_ids: Tensor, stop_token_ids: tuple[int, ...]) -> Tensor:
    """1 up to and including the first stop token, 0 after it, [B, R] long."""
    stops = torch.as_tensor(stop_token_ids, device=response_ids.device).reshape(-1)
    is_stop = torch.isin(response_ids, stops).long()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0
    return (~after_stop).long()
