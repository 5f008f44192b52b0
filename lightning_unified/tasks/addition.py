"""The built-in task: integer addition, e.g. prompt ``07+45=`` and response ``052``.

Operands are zero-padded to ``digits`` digits and the sum to ``digits + 1``, so every
answer has one length and every digit one position: a two-layer model learns it in a
minute on a CPU, which keeps every quadrant's example run short. Train and held-out
problems are disjoint and drawn from a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerFast

from lightning_unified.data.collate import ListDataset, TokenCollator, training_sampling
from lightning_unified.data.identity import check_same_data, data_identity
from lightning_unified.rewards.text import exact_match

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARACTERS = "0123456789+="
CHECKPOINTS = Path(__file__).parent / "checkpoints"


def checkpoint_path(name: str) -> str:
    """A checkpoint shipped with the package (``teacher``: the SFT preset's policy;
    ``rl_start``: a briefly trained SFT policy that RL improves on)."""
    path = CHECKPOINTS / name
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir()) if CHECKPOINTS.is_dir() else []
        raise FileNotFoundError(f"no built-in checkpoint {name!r} at {path}; known: {known}")
    return str(path)


def addition_tokenizer() -> PreTrainedTokenizerFast:
    """A real Hugging Face fast tokenizer with one token per character. Prompts are
    left-padded, so generated tokens line up across a batch."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def format_problem(a: int, b: int, digits: int) -> dict[str, str]:
    answer = f"{a + b:0{digits + 1}d}"
    return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=", "response": answer, "reference": answer}


def make_splits(digits: int, num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out problems. Raises if the digit count has too few problems."""
    if digits < 1:
        raise ValueError(f"task.digits must be >= 1, got {digits}")
    total = 10 ** (2 * digits)
    if num_train + num_val > total:
        raise ValueError(
            f"task: {num_train} train + {num_val} held-out problems requested, but {digits}-digit "
            f"addition has only {total}"
        )
    rng = random.Random(seed)
    if total <= 4 * (num_train + num_val):
        picks = rng.sample(range(total), num_train + num_val)
    else:
        seen: set[int] = set()
        picks = []
        while len(picks) < num_train + num_val:
            k = rng.randrange(total)
            if k not in seen:
                seen.add(k)
                picks.append(k)
    base = 10**digits
    problems = [format_problem(k // base, k % base, digits) for k in picks]
    return problems[num_val:], problems[:num_val]


def _completion_chars(completions: list[str], references: list[str]) -> list[tuple[str, str]]:
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    return [(c.strip(), r) for c, r in zip(completions, references)]


def digit_match(completions: list[str], references: list[str], **_) -> torch.Tensor:
    """The share of the reference's digits the completion gets right, position by position,
    with characters beyond the reference's length counted as wrong, [B]. A denser reward
    than exact match: a policy that gets two of three digits right gets 2/3."""
    scores = []
    for c, r in _completion_chars(completions, references):
        right = sum(x == y for x, y in zip(c, r))
        scores.append(right / max(len(r), len(c)))
    return torch.tensor(scores)


PromptResponseDataset = ListDataset


class PromptResponseCollator:
    """Examples {prompt, response?, reference} as text to the batch fields of
    :mod:`lightning_unified.batch`: prompts left-padded, responses right-padded and ended
    with EOS. Examples without a ``response`` (prompt-only data for on-policy runs) give
    prompts only."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.collate = TokenCollator(tokenizer.pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        tok = self.tokenizer
        # one batched tokenizer call per field: this runs for every training batch
        prompts = tok([e["prompt"] for e in examples], add_special_tokens=False).input_ids
        tokenized = [{"prompt_ids": p, "prompt": e["prompt"], "reference": e.get("reference"),
                      **({"index": e["index"]} if "index" in e else {})} for p, e in zip(prompts, examples)]
        for column, key in (("response", "response_ids"), ("response", "chosen_ids"), ("rejected", "rejected_ids")):
            if key != "response_ids" and not all("rejected" in e for e in examples):
                continue  # pairs only where every example has a rejected answer
            if all(column in e for e in examples):
                texts = tok([e[column] for e in examples], add_special_tokens=False).input_ids
                for example, ids in zip(tokenized, texts):
                    example[key] = ids + [tok.eos_token_id]
        return self.collate(tokenized)


def corrupted_answer(answer: str, rng: random.Random) -> str:
    """The answer with one digit changed: a wrong answer of the right form, the rejected
    side of a built-in preference pair."""
    position = rng.randrange(len(answer))
    wrong = rng.choice([d for d in "0123456789" if d != answer[position]])
    return answer[:position] + wrong + answer[position + 1:]


class AdditionDataModule(L.LightningDataModule):
    """Train and held-out addition problems. Training batches carry the reference
    response (off-policy data learns from it; on-policy sampling replaces it); held-out
    batches carry prompts and references only. ``pairs``: each training example is a
    preference pair instead, the right answer against one with a digit changed;
    ``val_pairs``: the held-out batches too (a reward model's pair accuracy), each problem's
    wrong answer drawn from its own seed, so held-out pairs share no problem with training."""

    def __init__(
        self,
        digits: int = 2,
        num_train: int = 9000,
        num_val: int = 500,
        batch_size: int = 64,
        val_batch_size: int = 500,
        seed: int = 0,
        num_workers: int = 0,
        pairs: bool = False,
        shuffle: bool = True,
        val_pairs: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = addition_tokenizer()
        self.train_problems, self.val_problems = make_splits(digits, num_train, num_val, seed)
        if pairs:  # preference pairs: the right answer (chosen) against one corrupted digit (rejected)
            rng = random.Random(f"pairs:{seed}")
            self.train_problems = [{**p, "rejected": corrupted_answer(p["response"], rng)} for p in self.train_problems]
        if val_pairs:
            rng = random.Random(f"val_pairs:{seed}")
            self.val_problems = [{**p, "rejected": corrupted_answer(p["response"], rng)} for p in self.val_problems]

    def data_identity(self) -> dict:
        """What this run trains on, as its checkpoints keep it (a resume on other data is refused)."""
        if getattr(self, "_identity", None) is None:  # digested once, not at every checkpoint
            h = self.hparams
            self._identity = data_identity(self.train_problems, f"the built-in task ({h.digits}-digit addition, "
                                                                f"{h.num_train} problems, seed {h.seed})")
        return self._identity

    def state_dict(self) -> dict:
        return {"data": self.data_identity()}

    def load_state_dict(self, state_dict: dict) -> None:
        check_same_data(state_dict.get("data"), self.data_identity())

    @property
    def max_new_tokens(self) -> int:
        """The answer's digits plus EOS."""
        return self.hparams.digits + 2

    @property
    def val_rewards(self) -> dict:
        """What validation reports: ``val/exact_match``."""
        return {"exact_match": exact_match}

    def training_examples(self) -> list[dict]:
        """The training examples as token ids ({prompt_ids, response_ids}, ending in EOS), in
        the order of their ``example_index``: what an offline teacher cache scores."""
        collate = PromptResponseCollator(self.tokenizer)
        out = []
        for start in range(0, len(self.train_problems), 1024):
            batch = collate([{k: p[k] for k in ("prompt", "response")} for p in self.train_problems[start:start + 1024]])
            for ids, mask, rids, rmask in zip(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                              batch["response_mask"]):
                out.append({"prompt_ids": ids[mask.bool()].tolist(), "response_ids": rids[rmask.bool()].tolist()})
        return out

    def train_dataloader(self) -> StatefulDataLoader:
        # stateful: a resumed run continues mid-epoch with the very batches it would have seen
        dataset = PromptResponseDataset(self.train_problems)
        return StatefulDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            **training_sampling(dataset, self.trainer, shuffle=self.hparams.shuffle, seed=self.hparams.seed),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            collate_fn=PromptResponseCollator(self.tokenizer),
        )

    def val_dataloader(self) -> StatefulDataLoader:
        keys = ("prompt", "reference", "response", "rejected") if self.hparams.val_pairs else ("prompt", "reference")
        prompts = [{k: e[k] for k in keys} for e in self.val_problems]
        return StatefulDataLoader(
            PromptResponseDataset(prompts),
            batch_size=self.hparams.val_batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=PromptResponseCollator(self.tokenizer),
        )
