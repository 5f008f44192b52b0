"""Training micro-batches filled to a token budget instead of a number of examples.

With ``task.max_tokens_per_batch`` a training batch takes examples, in an order shuffled by
``task.seed``, until the next one would pass the budget (or the batch holds
``task.batch_size`` examples): a batch of long examples holds few of them, a batch of
short ones many, so every micro-batch's forward does about the same work and none runs out
of memory on an unlucky draw of long examples. It pairs with ``module.packing``: packed,
a batch's forward holds about the budget in tokens; padded, padding comes on top.

The batches are formed once, when the data is loaded; each epoch then shuffles their order
(on several processes each rank takes every world_size-th batch, as it takes every
world_size-th example otherwise). An optimizer step's normaliser spans all its
micro-batches (``trainer.accumulate_grad_batches``) and ranks, so its gradient is that of
every token it saw, however they were split.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from lightning_unified.data.collate import ListDataset
from lightning_unified.data.files import DataError

log = logging.getLogger(__name__)


def example_tokens(example: dict, max_response_tokens: int) -> int:
    """The tokens an example puts through the model: its prompt and response; a preference
    pair's two rows (prompt + chosen, prompt + rejected); a prompt without a response, its
    prompt plus the longest reply sampling may write (each of ``num_generations`` samples
    is such a row, so sampling multiplies it)."""
    prompt = len(example["prompt_ids"])
    if example.get("chosen_ids") and example.get("rejected_ids"):
        return 2 * prompt + len(example["chosen_ids"]) + len(example["rejected_ids"])
    if example.get("response_ids"):
        return prompt + len(example["response_ids"])
    return prompt + max_response_tokens


def token_budget_batches(costs: list[int], max_tokens: int, max_examples: int | None = None, *,
                         shuffle: bool = True, seed: int = 0,
                         where: Callable[[int], str] | None = None) -> list[list[int]]:
    """Example indices grouped into batches of at most ``max_tokens`` tokens (``costs[i]``
    each) and ``max_examples`` examples, filled in a shuffled (``seed``) or the file's order.
    Every example is in exactly one batch; one that alone passes the budget is an error
    naming it (``where(i)``)."""
    if max_tokens < 1:
        raise ValueError(f"task.max_tokens_per_batch must be >= 1 or null, got {max_tokens}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"task.batch_size must be >= 1, got {max_examples}")
    for i, cost in enumerate(costs):
        if cost > max_tokens:
            name = where(i) if where is not None else f"example {i}"
            raise DataError(f"{name}: the example has {cost} tokens, over task.max_tokens_per_batch={max_tokens}; "
                            f"raise the budget (or lower task.max_prompt_tokens / task.max_response_tokens)")
    order = (torch.randperm(len(costs), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle
             else list(range(len(costs))))
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        full = max_examples is not None and len(current) == max_examples
        if current and (tokens + costs[i] > max_tokens or full):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += costs[i]
    if current:
        batches.append(current)
    return batches


class BatchDataset(Dataset):
    """Each item is one whole training batch: the examples of one token-budget batch, as
    :class:`ListDataset` gives them (with the ``index`` that keys an offline teacher cache)."""

    def __init__(self, examples: list[dict], batches: list[list[int]]):
        self.examples, self.batches = ListDataset(examples), batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> list[dict]:
        return [self.examples[i] for i in self.batches[b]]


def describe(batches: list[list[int]], costs: list[int], max_tokens: int) -> str:
    """One line for the log: how many batches, and how full they are."""
    sizes = [len(b) for b in batches]
    tokens = [sum(costs[i] for i in b) for b in batches]
    return (f"task.max_tokens_per_batch={max_tokens}: {len(batches)} batches per epoch, "
            f"{min(sizes)}-{max(sizes)} examples (median {statistics.median(sizes):g}), "
            f"median {statistics.median(tokens):g} tokens")
