"""Tokenized examples to the batch fields of :mod:`lightning_unified.batch`: prompts
left-padded (so generated tokens line up), responses right-padded."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_unified import batch as fields


def pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """([B, T] ids, [B, T] mask) with every row padded to the longest on ``side``."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class ListDataset(Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "index": i}  # the index keys an offline teacher cache


class TokenCollator:
    """Examples ``{prompt_ids, response_ids?, loss_mask?, reference?, reward?, prompt?, index?,
    chosen_ids?, rejected_ids?, margin?, teacher?}`` (token id lists; ``loss_mask`` 1 on the response
    tokens the loss trains on, all of them when absent; ``prompt`` the prompt as the data gave
    it) to a batch. Responses already end with their stop token. A batch where every example has
    a response is off-policy data; prompt-only examples give prompts only. A batch where
    every example has ``chosen_ids`` and ``rejected_ids`` is preference pairs: two rows per
    example, chosen then rejected, marked +1 / -1 in ``preference`` (and their ``margin``, on both
    rows, in ``pair_margin``)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        if examples and all(e.get("chosen_ids") and e.get("rejected_ids") for e in examples):
            return self._pairs(examples)
        out = {}
        out[fields.PROMPT_IDS], out[fields.PROMPT_MASK] = pad([e["prompt_ids"] for e in examples],
                                                               self.pad_token_id, "left")
        out[fields.REFERENCES] = [e.get("reference") for e in examples]
        if any("teacher_prompt" in e for e in examples):
            out[fields.TEACHER_PROMPTS] = [e.get("teacher_prompt") for e in examples]
        if all("prompt" in e for e in examples):
            out[fields.PROMPTS] = [e["prompt"] for e in examples]
        if all("index" in e for e in examples):
            out[fields.EXAMPLE_INDEX] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        if all(e.get("response_ids") for e in examples):
            out[fields.RESPONSE_IDS], out[fields.RESPONSE_MASK] = pad([e["response_ids"] for e in examples],
                                                                       self.pad_token_id, "right")
            # a conversation's loss covers its assistant turns only; a single-turn response is all loss
            out[fields.LOSS_MASK], _ = pad([e.get("loss_mask") or [1] * len(e["response_ids"]) for e in examples],
                                           0, "right")
        if all("teacher" in e for e in examples):
            out[fields.TEACHER_NAMES] = [e["teacher"] for e in examples]
        if all(e.get("reward") is not None for e in examples):
            out[fields.REWARDS] = torch.tensor([float(e["reward"]) for e in examples])
        return out

    def _pairs(self, examples: list[dict]) -> dict:
        rows = []
        for e in examples:
            for key in ("chosen_ids", "rejected_ids"):
                rows.append({"prompt_ids": e["prompt_ids"], "response_ids": e[key], "reference": e.get("reference"),
                             **{k: e[k] for k in ("prompt", "index", "teacher") if k in e}})
        out = self(rows)
        out[fields.PREFERENCE] = torch.tensor([1.0, -1.0] * len(examples))
        out[fields.GROUP_SIZE] = 2
        if all(e.get("margin") is not None for e in examples):  # TRL's margin column (a reward model's pairs)
            out[fields.PAIR_MARGIN] = torch.tensor([float(e["margin"]) for e in examples]).repeat_interleave(2)
        elif any(e.get("margin") is not None for e in examples):
            raise ValueError("a batch of pairs where some examples have a margin and others do not: give every "
                             "pair a margin (0 for none), or none")
        return out


def training_sampling(dataset: Dataset, trainer, *, shuffle: bool, seed: int) -> dict:
    """The DataLoader keywords that order a training set: ``shuffle`` on one process; on
    several, the task's own DistributedSampler, so ``shuffle`` and ``seed`` hold there too
    (Lightning's injected sampler always shuffles, with seed 0). Each rank takes every
    world_size-th example, so a global batch is the one a single process would read."""
    if trainer is None or trainer.world_size <= 1:
        return {"shuffle": shuffle}
    return {"sampler": DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                          shuffle=shuffle, seed=seed, drop_last=True)}
