"""Bad values are named at the door, before any data or model loads: the key, and what it
accepts. Every section's keys are checked against the annotations of what they are handed
to (the Trainer, the module, the task, the optimizer, the scheduler, the model builder, the
specs) and a table of ranges; a resumed run refuses training data that changed since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from lightning_unified.config import build_run, train
from lightning_unified.data.files import DataError
from lightning_unified.typecheck import ConfigError
from tests.lightning_helpers import FAST_TASK, compose_config, save_chat_model

BAD = [
    ("seed=abc", r"seed must be a whole number from 0 to 4294967295, got 'abc'"),
    ("seed=1.5", r"seed must be a whole number from 0 to 4294967295, got 1.5"),
    ("seed=-3", r"seed must be a whole number from 0"),
    ("validate_first=maybe", r"validate_first must be true or false, got 'maybe'"),
    ("checkpoint_every_n_steps=0", r"checkpoint_every_n_steps must be a whole number >= 1, got 0"),
    ("export_every=0", r"export_every must be a whole number of steps >= 1 or null, got 0"),
    ("export_keep=all", r"export_keep must be a whole number >= 1 or null, got 'all'"),
    ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches must be a whole number >= 1, got 0"),
    ("trainer.max_steps=-5", r"trainer.max_steps must be a whole number >= -1, got -5"),
    ("trainer.log_every_n_steps=0", r"trainer.log_every_n_steps must be a whole number >= 1, got 0"),
    ("module.peak_flops=0", r"module.peak_flops must be a number > 0"),
    ("module.detailed_metrics=maybe", r"module.detailed_metrics must be true or false, got 'maybe'"),
    ("trainer.val_check_interval=0", r"trainer.val_check_interval must be a whole number of steps >= 1"),
    ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val must be a number >= 0 or null, got -1"),
    ("trainer.precision=31", r"trainer.precision must be .*one of .*'32-true'"),
    ("trainer.devices=0", r"trainer.devices must be a whole number of devices >= 1"),
    ("trainer.num_nodes=0", r"trainer.num_nodes must be a whole number >= 1, got 0"),
    ("task.batch_size=0", r"task.batch_size must be a whole number >= 1, got 0"),
    ("task.num_train=many", r"task.num_train must be a whole number, got 'many'"),
    ("task.shuffle=sometimes", r"task.shuffle must be true or false, got 'sometimes'"),
    ("module.packing=maybe", r"module.packing must be true or false, got 'maybe'"),
    ("module.chunk_size=0", r"module.chunk_size must be a whole number >= 1, got 0"),
    ("module.temperature=0", r"module.temperature must be a number > 0, got 0"),
    ("module.non_finite=sometimes", r"module.non_finite must be one of 'skip', 'stop', got 'sometimes'"),
    ("module.aggregation=mean", r"module.aggregation must be .*one of .*'token_mean'"),
    ("optimizer.betas=[0.9]", r"optimizer.betas must be two numbers in \[0, 1\)"),
    ("optimizer.weight_decay=-0.1", r"optimizer.weight_decay must be a number >= 0, got -0.1"),
    ("scheduler.num_warmup_steps=-1", r"scheduler.num_warmup_steps must be a whole number >= 0, got -1"),
    ("model.seed=x", r"model.seed must be a whole number, got 'x'"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_named_before_anything_loads(override: str, message: str, tmp_path) -> None:
    # the policy's directory does not exist: the value is refused before anything tries to load it
    cfg = compose_config(["experiment=sft", *FAST_TASK, f"model.path={tmp_path / 'no_model'}", override])
    with pytest.raises(ConfigError, match=message):
        build_run(cfg, tmp_path / "run")


@pytest.mark.parametrize("override,message", [
    ("data_source.sampling.num_generations=abc", r"data_source.sampling.num_generations must be a whole number, got 'abc'"),
    ("data_source.importance.truncate=high", r"data_source.importance.truncate must be a number, got 'high'"),
    ("signal.std_eps=[1]", r"signal.std_eps must be a number, got \[1\]"),
    ("data_source.updates_per_rollout=1.5", r"data_source.updates_per_rollout must be a whole number, got 1.5"),
    ("validation.num_samples=four", r"validation.num_samples must be a whole number or null, got 'four'"),
])
def test_a_spec_value_of_the_wrong_type_is_named(override: str, message: str, tmp_path) -> None:
    cfg = compose_config(["experiment=rl", *FAST_TASK, f"model.path={tmp_path / 'no_model'}", override])
    with pytest.raises(InstantiationException, match=message):
        build_run(cfg, tmp_path / "run")


def test_a_resumed_run_refuses_training_data_that_changed(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    rows = [{"prompt": f"What is {a}+{b}?", "response": str(a + b)} for a in range(1, 7) for b in range(1, 5)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ["experiment=sft", f"model.path={model}", "task=files", f"task.train={train_file}", "task.batch_size=4",
           "trainer.max_steps=2", "checkpoint_every_n_steps=1", "validate_first=false", "save_policy=null",
           "task.max_response_tokens=8"]
    train(compose_config(run), tmp_path / "run")
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    with pytest.raises(DataError, match=r"resume: the checkpoint was trained on 24 examples of .*train.jsonl, but "
                                        r".*train.jsonl now holds 10"):
        train(compose_config([*run, "trainer.max_steps=3", "resume=true"]), tmp_path / "run")
    rows[0]["response"] = "3"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"holds 24 examples, as the checkpoint's .* did, but not the same ones"):
        train(compose_config([*run, "trainer.max_steps=3", "resume=true"]), tmp_path / "run")
    rows[0]["response"] = "2"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(compose_config([*run, "trainer.max_steps=3", "resume=true"]), tmp_path / "run")  # the same data resumes
