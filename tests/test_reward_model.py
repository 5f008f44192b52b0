"""signal=reward_model: a short real run on conversational pairs (with TRL's margin column)
writes an AutoModelForSequenceClassification directory that rewards.RewardModel loads, whose
scores are the ones trained, and which ranks held-out pairs; LoRA too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_unified.config import train
from lightning_unified.rewards.reward_model import RewardModel
from lightning_unified.specs import RewardPairs
from tests.lightning_helpers import chat_tokenizer, compose_config, save_chat_model


def _pairs(count: int, start: int) -> list[dict]:
    """Explicit-prompt conversational pairs: each question's chosen reply is 'yes', the
    rejected one 'no' (a preference the head can learn in a few steps), margin 0.5."""
    return [{"prompt": [{"role": "user", "content": f"is {i} a number?"}],
             "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}], "margin": 0.5} for i in range(start, start + count)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(tmp_path: Path, *extra: str) -> Path:
    model = save_chat_model(tmp_path / "start")
    train_file, val_file = _write(tmp_path / "train.jsonl", _pairs(16, 0)), _write(tmp_path / "val.jsonl", _pairs(8, 100))
    cfg = compose_config(["experiment=reward_model", f"model.path={model}", "task=files", f"task.train={train_file}",
                          f"task.val={val_file}", "task.batch_size=8", "task.val_batch_size=8", "trainer.max_steps=6",
                          "trainer.log_every_n_steps=1", "trainer.val_check_interval=6", "optimizer.lr=1e-2",
                          "scheduler=constant", "signal.center_rewards_coefficient=0.01", *extra])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["val/pair_accuracy"] == 1.0 and metrics["val/reward_margin"] > 0, metrics
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/pair_accuracy") for r in rows) and any(r.get("val/reward_margin") for r in rows)
    return tmp_path / "run" / "policy"


def _held_out_scores(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = chat_tokenizer()
    prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               for r in _pairs(8, 200)]
    scorer = RewardModel(str(directory))
    return scorer(completions=["yes"] * 8, prompts=prompts), scorer(completions=["no"] * 8, prompts=prompts)


def test_reward_model_run_saves_a_classifier_that_reward_model_loads_and_that_ranks_held_out_pairs(tmp_path):
    directory = _run(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    chosen, rejected = _held_out_scores(directory)
    assert (chosen > rejected).float().mean() > 0.5, (chosen, rejected)  # better than chance: here every pair


def test_the_saved_classifier_scores_what_training_scored(tmp_path):
    """Hugging Face's pooling (the rightmost non-pad token, pad = EOS) reads the same token
    the training forward scored: the last one that is not a stop token."""
    from lightning_unified.data.chat import stop_token_ids
    from lightning_unified.models.loading import build_policy
    from lightning_unified.models.scalar_head import ScalarHead, as_sequence_classifier, sequence_scores
    from lightning_unified.objectives import objective_for
    from tests.lightning_helpers import TINY

    tokenizer = chat_tokenizer()
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    policy = build_policy(tokenizer, config=TINY, seed=3).eval()
    objective = objective_for(RewardPairs(), policy)
    assert isinstance(objective.head, ScalarHead)
    prompts, replies = ["ab", "abcde"], ["xy", "z"]
    stop = stop_token_ids(tokenizer)
    p = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    tokenizer.padding_side = "right"
    r = tokenizer([x + tokenizer.eos_token for x in replies], padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        trained = sequence_scores(policy, objective.head, p.input_ids, p.attention_mask, r.input_ids,
                                  r.attention_mask, stop)
        classifier = as_sequence_classifier(policy, objective.head, tokenizer.pad_token_id)
        whole = tokenizer([a + b for a, b in zip(prompts, replies)], padding=True, return_tensors="pt",
                          add_special_tokens=False)
        loaded = classifier(**whole).logits[:, 0]
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert trained[0] != trained[1]


def test_lora_reward_model_saves_a_merged_classifier_reward_model_loads(tmp_path):
    pytest.importorskip("peft")
    directory = _run(tmp_path, "model.lora.r=4", "save_merged=true")
    assert not (directory / "adapter_config.json").exists(), "a scorer needs the whole model, merged"
    assert not (tmp_path / "run" / "policy_merged").exists()
    chosen, rejected = _held_out_scores(directory)
    assert (chosen > rejected).float().mean() > 0.5, (chosen, rejected)


def test_reward_model_needs_pairs_and_off_policy_data(tmp_path):
    from lightning_unified.pipeline import check_method
    from lightning_unified.rules import RuleError
    from lightning_unified.specs import OnPolicy, Sampling

    with pytest.raises(RuleError, match="signal=reward_model trains a scalar head on the data's preference pairs"):
        check_method(OnPolicy(sampling=Sampling(num_generations=2)), RewardPairs())
    with pytest.raises(ValueError, match="center_rewards_coefficient must be a number >= 0"):
        RewardPairs(center_rewards_coefficient=-1.0)
