"""Tiny real models and runs for the Lightning-level tests: 2 layers, width 64."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from lightning_unified.config import CONFIG_DIR
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.tasks.addition import AdditionDataModule

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)

# small runs: a few problems, a small held-out split
FAST_TASK = ["task.num_train=256", "task.num_val=32", "task.batch_size=8", "task.val_batch_size=32"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def tiny_datamodule(batch_size: int = 4) -> AdditionDataModule:
    return AdditionDataModule(num_train=64, num_val=8, batch_size=batch_size, val_batch_size=8)


def tiny_module(data_source, signal, seed: int = 0) -> UnifiedModule:
    datamodule = tiny_datamodule()
    policy = build_policy(datamodule.tokenizer, config=TINY, seed=seed)
    return UnifiedModule(policy, datamodule.tokenizer, data_source, signal,
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))


def save_tiny_teacher(directory: Path) -> str:
    datamodule = tiny_datamodule()
    build_policy(datamodule.tokenizer, config=TINY, seed=123).save_pretrained(directory)
    return str(directory)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer():
    """A real character-level fast tokenizer with a ChatML template, EOS and no pad token
    (like many chat checkpoints), so loading has to give it one."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def save_chat_model(directory: Path, seed: int = 0, **config) -> str:
    """A tiny Llama and its chat tokenizer in one directory, as save_pretrained writes them."""
    tokenizer = chat_tokenizer()
    model = build_policy(tokenizer, config={**TINY, "max_position_embeddings": 256, **config}, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def pairs_tokenizer():
    """A real fast tokenizer for the built-in task's text that reads digits two at a time
    ("052" is "05", "2"): another vocabulary than the task's, cut at other places."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"{a}{b}" for a in range(10) for b in range(10)] + [str(d) for d in range(10)] + ["+", "="]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def pairs_datamodule(batch_size: int = 4) -> AdditionDataModule:
    """The built-in task's problems in :func:`pairs_tokenizer`'s tokens."""
    datamodule = tiny_datamodule(batch_size)
    datamodule.tokenizer = pairs_tokenizer()
    return datamodule


def save_pairs_model(directory: Path, seed: int = 0) -> str:
    """A tiny Llama with :func:`pairs_tokenizer`, saved with it."""
    tokenizer = pairs_tokenizer()
    build_policy(tokenizer, config=TINY, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
