"""Bad input stops with an error that names the field, the path or the function at fault."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_unified.stages.advantages import estimate_advantages
from lightning_unified.rewards.scoring import compute_rewards
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.config import build_run
from lightning_unified.specs import (
    Dense,
    Importance,
    OffPolicy,
    OnPolicy,
    Reference,
    Reward,
    Sampling,
    Sparse,
)
from lightning_unified.tasks.addition import checkpoint_path, make_splits
from tests.lightning_helpers import FAST_TASK, compose_config, tiny_module


@pytest.mark.parametrize(
    "override,message",
    [
        ("signal.advantage=ppo", "signal.advantage must be one of"),
        ("data_source.importance.ratio=sometimes", "importance.ratio must be one of"),
        ("data_source.sampling.num_generations=0", "sampling.num_generations must be >= 1"),
        ("data_source.probability=1.5", "data_source.probability must be in"),
    ],
)
def test_bad_config_values_name_the_field(override: str, message: str, tmp_path) -> None:
    cfg = compose_config(["experiment=rl", override, *FAST_TASK])
    with pytest.raises(InstantiationException, match=message):
        build_run(cfg, tmp_path)


def test_bad_spec_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="signal.divergence must be one of"):
        Dense(teacher="x", divergence="kl")
    with pytest.raises(ValueError, match="top_k=4 gives the teacher.s top-k, from which signal.divergence=.reverse_kl. cannot run"):
        Dense(teacher="x", divergence="reverse_kl", top_k=4)
    with pytest.raises(ValueError, match="sampling.top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="importance.truncate"):
        Importance(truncate=0.0)
    with pytest.raises(ValueError, match="reference.estimator must be one of"):
        Reference(estimator="k2")


def test_missing_checkpoints_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no built-in checkpoint 'nope'"):
        checkpoint_path("nope")
    module = tiny_module(OffPolicy(), Dense(teacher=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="missing"):
        TeacherStage(module.signal).setup(None, module, "fit")


def test_teacher_with_another_vocabulary_is_refused(tmp_path) -> None:
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    module = tiny_module(OffPolicy(), Dense(teacher=str(tmp_path)))
    with pytest.raises(ValueError, match="vocabulary of 40 tokens and the policy 15"):
        TeacherStage(module.signal).setup(None, module, "fit")


def test_reward_function_with_the_wrong_shape_is_named() -> None:
    def per_batch(completions, **_):
        return torch.tensor(1.0)

    with pytest.raises(ValueError, match="reward per_batch returned shape"):
        compute_rewards([Reward(per_batch)], completions=["1", "2"], references=["1", "2"])


def test_group_estimators_need_groups() -> None:
    with pytest.raises(ValueError, match="num_generations >= 2"):
        estimate_advantages(torch.ones(4), "grpo", group_size=1)


def test_task_too_small_for_the_split() -> None:
    with pytest.raises(ValueError, match="1-digit addition has only 100"):
        make_splits(1, num_train=90, num_val=20, seed=0)


def test_rl_needs_rewards() -> None:
    # refused when the module is built, not at the first training step
    with pytest.raises(ValueError, match="is RL, which needs rewards.*Set signal.rewards"):
        tiny_module(OnPolicy(), Sparse())
