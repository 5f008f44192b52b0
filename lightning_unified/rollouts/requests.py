"""What is asked of the engine for one training batch, the same whenever it is asked (now,
or by the producer ahead of the trainer) and on every resume: whether a mixed source's
batch is sampled, the seed of its draws, and the request itself."""

from __future__ import annotations

import random

from lightning_unified.engines.base import GenerationRequest


def mixed_batch_is_on_policy(probability: float, seed: int, epoch: int, batch_idx: int) -> bool:
    """The same draw on every rank, and again after a resume, and known ahead of the batch
    (a producer sampling ahead asks): it depends only on the seed, the epoch and the batch."""
    if probability >= 1.0:
        return True
    if probability <= 0.0:
        return False
    return random.Random(f"{seed}:{epoch}:{batch_idx}").random() < probability


def sampling_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The draws of one batch on one rank: whenever it is sampled (now, or ahead of the
    trainer), and whatever else used the global RNG before."""
    return random.Random(f"sample:{seed}:{epoch}:{batch_idx}:{rank}").getrandbits(63)


def sampling_request(sampling, host, *, seed: int, synced: bool, max_new_tokens: int | None = None,
                     cancelled=None) -> GenerationRequest:
    """The request of ``sampling`` (a :class:`~lightning_unified.specs.Sampling`) for one
    batch: its distribution, the host's stop and pad tokens, the longest response
    (``max_new_tokens``, else the spec's, else the host's). ``cancelled``: an event that ends
    the generation early when set (a producer being stopped)."""
    return GenerationRequest(
        max_new_tokens=max_new_tokens or sampling.max_new_tokens or host.max_new_tokens,
        stop_token_ids=tuple(host.stop_token_ids), pad_token_id=host.tokenizer.pad_token_id,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, behaviour=sampling.behaviour,
        seed=seed, synced=synced, cancelled=cancelled,
    )
