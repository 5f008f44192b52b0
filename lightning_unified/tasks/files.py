"""A task from your own files: prompts (plain strings or chat messages), optional
responses, references and rewards, in JSONL, Parquet or a saved ``datasets`` dataset.

    python scripts/train.py experiment=sft model.path=DIR task=files task.train=train.jsonl task.val=val.jsonl

The tokenizer is the policy's (``task.tokenizer`` defaults to ``model.path``). Validation
decodes the held-out prompts greedily and scores them with ``val_rewards``, logged as
``val/<name>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import lightning as L
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_unified.data.chat import end_of_turn_id
from lightning_unified.data.conversations import LOSS_ON
from lightning_unified.data.collate import ListDataset, TokenCollator, training_sampling
from lightning_unified.data.files import DataError, Limits, locate_row, read_table, tokenize_table
from lightning_unified.data.identity import check_same_data, data_identity
from lightning_unified.data.token_budget import BatchDataset, describe, example_tokens, token_budget_batches
from lightning_unified.models.loading import load_tokenizer
from lightning_unified.rewards.scoring import names_parameter
from lightning_unified.rewards.text import exact_match

log = logging.getLogger(__name__)


class FilesDataModule(L.LightningDataModule):
    """``train`` (and optional ``val``) files; ``columns`` renames the columns
    (``{prompt: question, reference: answer}``); a ``messages`` column of conversations
    trains ``loss_on`` its assistant turns (``all_assistant`` or ``last_assistant``, see
    :mod:`lightning_unified.data.conversations`); ``max_prompt_tokens`` and
    ``max_response_tokens`` bound an example, ``overlong`` says what happens above them
    (``error`` or ``drop``, counted in the log). ``max_tokens_per_batch`` fills each training
    batch to a token budget (at most ``batch_size`` examples), see
    :mod:`lightning_unified.data.token_budget`. ``max_response_tokens`` also bounds
    sampling and greedy validation. The files are read and checked when the data module
    is built, so bad input stops a run before any model is loaded."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        tokenizer: str | None = None,
        columns: Mapping[str, str] | None = None,
        max_prompt_tokens: int | None = 512,
        max_response_tokens: int = 256,
        overlong: str = "error",
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        val_batch_size: int = 32,
        val_rewards: Mapping[str, Callable] | None = None,
        pad_token: str | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        seed: int = 0,
        loss_on: str = "all_assistant",
        val_pairs: bool = False,
    ):
        super().__init__()
        if tokenizer is None:
            raise ValueError("task=files needs a tokenizer: set model.path (a Hugging Face directory with its "
                             "tokenizer) or task.tokenizer")
        if loss_on not in LOSS_ON:
            raise ValueError(f"task.loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if max_response_tokens is None or max_response_tokens < 1:
            raise ValueError(f"task.max_response_tokens must be >= 1 (it also bounds sampling), got {max_response_tokens}")
        self.tokenizer = load_tokenizer(tokenizer, pad_token=pad_token, trust_remote_code=trust_remote_code)
        self.limits = Limits(max_prompt_tokens, max_response_tokens, overlong)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self._val_rewards = dict(val_rewards) if val_rewards else {"exact_match": exact_match}
        stop = end_of_turn_id(self.tokenizer)
        self.train_path = train
        self._teachers_seen: dict[str, str] = {}
        self.loss_on = loss_on
        self.train_examples = self._load(train, columns, stop, self._teachers_seen, loss_on=loss_on)
        # validation answers a held-out conversation's last turn
        self.val_examples = self._load(val, columns, stop, loss_on="last_assistant") if val is not None else []
        log.info("task=files: %d training examples from %s, %d held-out from %s", len(self.train_examples), train,
                 len(self.val_examples), val)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.budget_batches = None
        if max_tokens_per_batch is not None:
            costs = [example_tokens(e, self.limits.max_response_tokens) for e in self.train_examples]
            self.budget_batches = token_budget_batches(
                costs, max_tokens_per_batch, batch_size, shuffle=shuffle, seed=seed,
                where=lambda i: locate_row(train, self.train_examples[i]["row"]))
            log.info("%s", describe(self.budget_batches, costs, max_tokens_per_batch))
        needs = sorted(name for name, fn in self._val_rewards.items() if names_parameter(fn, "references"))
        self.val_pairs = val_pairs
        if val_pairs and self.val_examples and "chosen_ids" not in self.val_examples[0]:
            raise DataError(f"{val}: task.val_pairs=true ranks held-out pairs, but the file has no chosen and rejected "
                            f"columns (task.columns.chosen, task.columns.rejected)")
        # held-out pairs are ranked by a reward model, not answered greedily
        if self.val_examples and needs and "reference" not in self.val_examples[0] and not val_pairs:
            column = dict(columns or {}).get("reference", "reference")
            raise DataError(f"{val}: task.val_rewards {needs} compare each answer with a reference, but the file has "
                            f"no {column!r} column (task.columns.reference)")

    def _load(self, path: str, columns, stop: int, teachers_seen: dict | None = None,
              loss_on: str = "all_assistant") -> list[dict]:
        return tokenize_table(read_table(path), path, self.tokenizer, columns=columns, limits=self.limits, stop_id=stop,
                              teachers_seen=teachers_seen, loss_on=loss_on)

    def data_identity(self) -> dict:
        """What this run trains on, as its checkpoints keep it (a resume on other data is
        refused); digested once, not at every checkpoint."""
        if getattr(self, "_identity", None) is None:
            self._identity = data_identity(self.train_examples, str(self.train_path))
        return self._identity

    def state_dict(self) -> dict:
        return {"data": self.data_identity()}

    def load_state_dict(self, state_dict: dict) -> None:
        check_same_data(state_dict.get("data"), self.data_identity())

    def teacher_names(self) -> dict[str, str]:
        """{teacher name: where the first training example naming it is}, from the data's
        ``teacher`` column (``task.columns.teacher``); empty without one."""
        return dict(self._teachers_seen)

    @property
    def max_new_tokens(self) -> int:
        return self.limits.max_response_tokens

    @property
    def val_rewards(self) -> dict[str, Callable]:
        return dict(self._val_rewards)

    def training_examples(self) -> list[dict]:
        """The training examples as token ids ({prompt_ids, response_ids}), in the order of
        their ``example_index``: what an offline teacher cache scores."""
        if not all("response_ids" in e for e in self.train_examples):
            raise ValueError("a teacher cache scores the data's responses; the training data has no response column")
        return [{"prompt_ids": e["prompt_ids"], "response_ids": e["response_ids"]} for e in self.train_examples]

    def _loader(self, examples: list[dict], batch_size: int, train: bool) -> StatefulDataLoader:
        # stateful: a resumed run continues mid-epoch with the very batches it would have seen
        dataset = ListDataset(examples)
        order = training_sampling(dataset, self.trainer, shuffle=self.shuffle, seed=self.seed) if train else {}
        return StatefulDataLoader(dataset, batch_size=batch_size, **order,
                                  drop_last=train and len(examples) >= batch_size, num_workers=self.num_workers,
                                  collate_fn=TokenCollator(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> StatefulDataLoader:
        if self.budget_batches is None:
            return self._loader(self.train_examples, self.batch_size, train=True)
        # each item is a whole batch (formed to the token budget at load time): no auto-batching;
        # the sampler shuffles the batches' order each epoch, and deals them out to the ranks
        dataset = BatchDataset(self.train_examples, self.budget_batches)
        order = training_sampling(dataset, self.trainer, shuffle=self.shuffle, seed=self.seed)
        return StatefulDataLoader(dataset, batch_size=None, **order, num_workers=self.num_workers,
                                  collate_fn=TokenCollator(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> StatefulDataLoader | list:
        if not self.val_examples:
            return []
        # validation generates from the prompt; the responses stay out of the batch, except a
        # pair's two replies, which a reward model ranks (val_pairs)
        keep = ("prompt_ids", "prompt", "reference") + (("chosen_ids", "rejected_ids", "margin") if self.val_pairs else ())
        prompts = [{k: v for k, v in e.items() if k in keep} for e in self.val_examples]
        return self._loader(prompts, self.val_batch_size, train=False)
