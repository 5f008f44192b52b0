"""The built-in tool task: products of three-digit numbers, with a ``multiply`` tool.

A two-layer model cannot multiply ``123*456`` in its head, but it can learn to call the
tool and copy the result::

    <user>123*456<end>
    <assistant><tool_call>{"name": "multiply", "arguments": {"a": 123, "b": 456}}</tool_call><end>
    <tool>56088<end>
    <assistant>56088<end>

The tokenizer has one token per printable character, special tokens for the roles, and
single tokens for the tool call's fixed text (as a BPE tokenizer would merge it). Training
examples are written demonstrations of that conversation (multi-turn SFT, loss on both
assistant turns); on-policy runs talk to :class:`MultiplyEnvironment`, which offers the tool
and scores the final answer against the true product. Validation runs the same episodes,
greedily.
"""

from __future__ import annotations

import json
import random
import string

import lightning as L
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AddedToken, PreTrainedTokenizerFast

from lightning_unified.data.collate import ListDataset, TokenCollator, training_sampling
from lightning_unified.data.conversations import render_conversation
from lightning_unified.data.identity import check_same_data, data_identity
from lightning_unified.environments.base import Environment, Reset, Step
from lightning_unified.environments.episodes import render_ids
from lightning_unified.environments.tools import tool_schemas
from lightning_unified.rewards.text import exact_match
from lightning_unified.specs import Environment as EnvironmentSpec

PAD, END, UNK = "<pad>", "<end>", "<unk>"
ROLES = ("<system>", "<user>", "<assistant>", "<tool>")
# the tool call's fixed text, one token each
CALL_PIECES = ("<tool_call>", "</tool_call>", '{"name": "', '", "arguments": {', '"a": ', ', "b": ', "}}", "multiply")
TEMPLATE = (
    "{%- if tools %}<system>tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}<end>{% endif %}"
    "{%- for message in messages %}<{{ message.role }}>{{ message.content }}<end>{% endfor %}"
    "{%- if add_generation_prompt %}<assistant>{% endif %}"
)


def tool_chat_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, role tokens, and the tool call's pieces, with
    a chat template that renders tools, roles and turns compactly (prefix-consistent: each
    turn's render extends the last)."""
    characters = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate([PAD, END, UNK, *characters])}
    model = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    model.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, eos_token=END, unk_token=UNK,
                                        padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLES)})
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in CALL_PIECES])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def tool_call_text(a: int, b: int) -> str:
    return f"<tool_call>{json.dumps({'name': 'multiply', 'arguments': {'a': a, 'b': b}})}</tool_call>"


class MultiplyEnvironment(Environment):
    """Offers ``multiply`` (``offer_tool=False``: nothing); the first turn without a tool
    call is the answer: reward 1 when it is the product, else 0, and the episode ends."""

    def __init__(self, offer_tool: bool = True):
        self.offer_tool = offer_tool

    def reset(self, row: dict) -> Reset:
        prompt = row["prompt"]
        messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
        self.reference = row["reference"]
        return Reset(messages, tools=[multiply] if self.offer_tool else [])

    def step(self, message: dict) -> Step:
        return Step(reward=float(message["content"].strip() == self.reference), done=True)


def make_problems(num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out pairs of three-digit factors."""
    total = 900 * 900
    if num_train + num_val > total:
        raise ValueError(f"task: {num_train} + {num_val} problems requested, but there are only {total}")
    picks = random.Random(seed).sample(range(total), num_train + num_val)
    problems = []
    for k in picks:
        a, b = 100 + k // 900, 100 + k % 900
        problems.append({"a": a, "b": b, "prompt": [{"role": "user", "content": f"{a}*{b}"}],
                         "reference": str(a * b)})
    return problems[num_val:], problems[:num_val]


def demonstration(problem: dict, use_tool: bool = True) -> list[dict]:
    """The written conversation that uses the tool once and answers with its result (or,
    without the tool, answers at once)."""
    a, b = problem["a"], problem["b"]
    if not use_tool:
        return [*problem["prompt"], {"role": "assistant", "content": str(a * b)}]
    return [*problem["prompt"], {"role": "assistant", "content": tool_call_text(a, b)},
            {"role": "tool", "name": "multiply", "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)}]


class MultiplyDataModule(L.LightningDataModule):
    """``num_train`` demonstrations (the prompts on-policy runs sample from too) and
    ``num_val`` held-out problems. ``environment``: what validation (and on-policy
    sampling, through ``data_source.environment``) talks to. ``use_tool=False``: the same
    task with no tool, in the demonstrations or the environment (what a model does alone)."""

    def __init__(self, num_train: int = 400, num_val: int = 200, batch_size: int = 16, val_batch_size: int = 200,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0, max_turns: int = 3, max_tokens: int = 64,
                 use_tool: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = tool_chat_tokenizer()
        self.train_problems, self.val_problems = make_problems(num_train, num_val, seed)
        self.environment = EnvironmentSpec(cls=MultiplyEnvironment, options={"offer_tool": use_tool},
                                           max_turns=max_turns, max_tokens=max_tokens)
        self.schemas = tool_schemas([multiply]) if use_tool else []
        self._examples = None

    @property
    def max_new_tokens(self) -> int:
        """A turn's longest reply: the tool call (14 tokens) or the answer, with its end."""
        return 16

    @property
    def val_rewards(self) -> dict:
        """``val/exact_match``: the episode's last reply is the product (beside the episodes'
        own ``val/reward`` and ``val/turns``)."""
        return {"exact_match": exact_match}

    def data_identity(self) -> dict:
        if getattr(self, "_identity", None) is None:
            h = self.hparams
            self._identity = data_identity(self.train_problems, f"the built-in tool task ({h.num_train} problems, "
                                                                f"seed {h.seed})")
        return self._identity

    def state_dict(self) -> dict:
        return {"data": self.data_identity()}

    def load_state_dict(self, state_dict: dict) -> None:
        check_same_data(state_dict.get("data"), self.data_identity())

    def training_examples(self) -> list[dict]:
        """Each demonstration as token ids: the prompt (with the tool's schema rendered), then
        both assistant turns (loss mask 1) and the tool's answer between them (loss mask 0)."""
        if self._examples is None:
            end = self.tokenizer.convert_tokens_to_ids(END)
            self._examples = []
            for i, problem in enumerate(self.train_problems):
                trajectory = render_conversation(self.tokenizer, demonstration(problem, self.hparams.use_tool),
                                                 stop_id=end, tools=self.schemas, where=f"tool task demonstration {i}")
                self._examples.append({"prompt_ids": trajectory.prompt_ids, "response_ids": trajectory.response_ids,
                                       "loss_mask": trajectory.loss_mask, "prompt": problem["prompt"],
                                       "reference": problem["reference"]})
        return self._examples

    def train_dataloader(self) -> StatefulDataLoader:
        dataset = ListDataset(self.training_examples())
        return StatefulDataLoader(dataset, batch_size=self.hparams.batch_size, drop_last=True,
                                  **training_sampling(dataset, self.trainer, shuffle=self.hparams.shuffle,
                                                      seed=self.hparams.seed),
                                  num_workers=self.hparams.num_workers,
                                  collate_fn=TokenCollator(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> StatefulDataLoader:
        examples = [{"prompt_ids": render_ids(self.tokenizer, p["prompt"], self.schemas, True), "prompt": p["prompt"],
                     "reference": p["reference"]} for p in self.val_problems]
        return StatefulDataLoader(ListDataset(examples), batch_size=self.hparams.val_batch_size,
                                  num_workers=self.hparams.num_workers,
                                  collate_fn=TokenCollator(self.tokenizer.pad_token_id))
