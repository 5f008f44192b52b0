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
