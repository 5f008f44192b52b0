"""A user's mistakes never cost data or silently change the run: each case here went on,
wrong, or pointed the wrong way, before it was refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unified.config import build_run, train
from lightning_unified.data.files import DataError, read_table
from lightning_unified.models.loading import load_causal_lm, load_tokenizer
from tests.lightning_helpers import FAST_TASK, compose_config, save_chat_model
from tests.test_runs import ROOT

SHORT = ["experiment=sft", *FAST_TASK, "trainer.max_steps=2", "trainer.val_check_interval=2",
         "checkpoint_every_n_steps=2", "save_policy=null"]


# --- one run per directory; nothing written before the checks pass --------------------------------
def test_a_second_run_into_a_finished_runs_directory_is_refused(tmp_path: Path) -> None:
    train(compose_config(SHORT), tmp_path)
    before = (tmp_path / "metrics.csv").read_bytes()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics.csv, checkpoints\): add resume=true"):
        train(compose_config([*SHORT, "optimizer.lr=1e-2"]), tmp_path)
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints


def test_a_refused_resume_leaves_the_runs_metrics_whole(tmp_path: Path) -> None:
    train(compose_config([*SHORT, "trainer.max_steps=3", "checkpoint_every_n_steps=2"]), tmp_path)
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match="the checkpoint was written by a run with"):
        train(compose_config([*SHORT, "experiment=distill", "trainer.max_steps=3", "resume=true"]), tmp_path)
    assert (tmp_path / "metrics.csv").read_bytes() == before, "nothing is cut before the checkpoint is accepted"


def test_a_garbage_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match=r"last\.ckpt cannot be read as a checkpoint .* may be truncated"):
        train(compose_config([*SHORT, "resume=true"]), tmp_path)


def test_compare_refuses_two_runs_in_one_file_and_lists_crashed_runs_as_failed(tmp_path: Path) -> None:
    def write(run: str, steps: list[int]) -> None:
        (tmp_path / run / ".hydra").mkdir(parents=True)
        rows = "".join(f"{s},0.5,{s}.0,{10 * s}\n" for s in steps)
        (tmp_path / run / "metrics.csv").write_text("step,val/exact_match,train/train_seconds,train/tokens_seen\n" + rows)

    write("0_good", [0, 1, 2])
    (tmp_path / "1_crashed" / ".hydra").mkdir(parents=True)
    write("2_diverged", [0, 1, 2, 3])  # it validated, then stopped: its log says why
    (tmp_path / "2_diverged" / "train.log").write_text(
        "[2026-12-06 05:21:30,100][lightning_unified.config][INFO] - method: data_source=on_policy\n"
        "[2026-12-06 05:21:30,453][lightning_unified.config][ERROR] - the run failed: NonFiniteError: step 3: "
        "non-finite gradient\n")
    script = [sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path), "--out", str(tmp_path / "out")]
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "out" / "comparison.md").read_text()
    finished, failed = report.split("## Runs that did not finish")
    assert "0_good" in finished and "1_crashed" not in finished and "2_diverged" not in finished
    assert "| 1_crashed | 1_crashed | - | (no log, no metrics.csv) |" in failed
    assert "| 2_diverged | 2_diverged | 3 | the run failed: NonFiniteError: step 3: non-finite gradient |" in failed
    assert "failed: " in done.stderr
    write("3_mixed", [0, 1, 2, 0, 1])
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode != 0
    assert "3_mixed/metrics.csv, line 5: step 0 after step 2" in done.stderr


# --- only causal decoders -----------------------------------------------------------------------
def test_an_encoder_is_refused_as_a_causal_lm(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertLMHeadModel is not a causal decoder"):
        load_causal_lm(tmp_path)


def test_a_soft_capped_head_is_refused_by_name() -> None:
    """Gemma 2 soft-caps its logits; the chunked loss's logits are a linear map, so training
    one would silently compute another model's gradient."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from lightning_unified.models.loading import trainable_policy
    from lightning_unified.tasks.addition import addition_tokenizer

    tokenizer = addition_tokenizer()
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16))
    with pytest.raises(NotImplementedError, match=r"policy soft-caps its logits \(final_logit_softcapping\)"):
        trainable_policy(model, tokenizer)


# --- a model directory that is not one ---------------------------------------------------------------
def test_a_model_path_that_is_not_a_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no tokenizer .*holds nothing"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file.txt is a file"):
        load_tokenizer(tmp_path / "file.txt")
    model = Path(save_chat_model(tmp_path / "model"))
    (model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has a config.json but no weights"):
        load_causal_lm(model)
    (model / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json, so it is not a Hugging Face model directory"):
        load_causal_lm(model)


# --- data ----------------------------------------------------------------------------------------------
def test_an_empty_jsonl_says_it_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"train.jsonl is empty: it holds no examples"):
        read_table(path)


def test_a_chat_role_typo_is_named_with_its_line_and_message(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": "What is 1+1?"}], "response": "2"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "usr", "content": "2+2?"}],
             "response": "4"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["experiment=sft", "task=files", f"task.train={path}", f"model.path={model}"])
    # Hydra wraps the DataError, message kept, in an InstantiationException
    with pytest.raises(Exception, match=r"train.jsonl, line 2: column 'prompt', message 1 has role 'usr'"):
        build_run(cfg, tmp_path / "run")


def test_a_mixed_source_on_a_prompt_only_file_is_refused_at_start(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1+1?"}) + "\n")
    cfg = compose_config(["experiment=gkd", "task=files", f"task.train={path}", f"model.path={model}",
                          f"teacher.path={model}"])
    with pytest.raises(ValueError, match=r"data_source=mixed keeps the data's responses in 50% of its batches, but "
                                         r".*train.jsonl has none"):
        build_run(cfg, tmp_path / "run")


# --- settings that can only fail, refused before any model work --------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer.lr=-0.001"], r"optimizer.lr must be a number > 0, got -0.001"),
    (["experiment=rl", "data_source.sampling.num_generations=1"], r"signal.advantage='grpo' compares each sample"),
    (["experiment=online_dpo", "data_source.sampling.num_generations=1"], r"online DPO picks a chosen and a rejected"),
])
def test_settings_that_can_only_fail_are_refused_before_loading(overrides: list[str], message: str,
                                                                tmp_path: Path) -> None:
    # a model path that does not exist: the setting is refused before anything looks for it
    cfg = compose_config([*overrides, "task=files", f"task.train={tmp_path / 'none.jsonl'}",
                          f"model.path={tmp_path / 'none'}",
                          "signal.rewards=[{_target_: lightning_unified.specs.Reward, "
                          "fn: {_target_: lightning_unified.rewards.exact_match, _partial_: true}}]"])
    with pytest.raises(ValueError, match=message):
        build_run(cfg, tmp_path / "run")


def test_rewards_that_need_references_on_data_without_them_are_refused_at_start(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "What is 1+1?", "reference": "2"}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n")
    cfg = compose_config(["experiment=sft", "task=files", f"task.train={tmp_path / 'train.jsonl'}",
                          f"task.val={tmp_path / 'val.jsonl'}", f"model.path={model}", "task.columns.response=null"])
    with pytest.raises(Exception, match=r"val.jsonl: task.val_rewards \['exact_match'\] compare each answer with a "
                                        r"reference, but the file has no 'reference' column"):
        build_run(cfg, tmp_path / "run")
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "What is 1+1?"}) + "\n")
    cfg = compose_config(["experiment=rl", "task=files", f"task.train={tmp_path / 'train.jsonl'}", f"model.path={model}",
                          "signal.rewards=[{_target_: lightning_unified.specs.Reward, "
                          "fn: {_target_: lightning_unified.rewards.numeric_answer, _partial_: true}}]"])
    with pytest.raises(ValueError, match=r"signal.rewards \['numeric_answer'\] compare each answer with a reference, "
                                         r"but .*train.jsonl has no reference column"):
        build_run(cfg, tmp_path / "run")


def test_a_run_without_a_logger_writes_nothing_into_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """A committed samples.jsonl at the repository's root came from a test run like this one:
    samples went to ``trainer.log_dir``, which without a logger is the working directory.
    They now go only to the run's logger directory, and a run without one writes none."""
    from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
    from lightning_unified.tasks.addition import digit_match
    from tests.lightning_helpers import quiet_trainer, tiny_datamodule, tiny_module

    monkeypatch.chdir(tmp_path)
    module = tiny_module(OnPolicy(sampling=Sampling(num_generations=2)), Sparse(rewards=[Reward(digit_match)]))
    module.samples_every_n_steps = 1
    quiet_trainer(max_steps=2, limit_val_batches=1).fit(module, datamodule=tiny_datamodule())
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the run wrote into the working directory"


def test_sft_on_a_file_of_preference_pairs_is_refused(tmp_path: Path) -> None:
    """Every example with chosen and rejected made the collator emit pairs, so SFT trained on
    the rejected responses too, silently; now only signal=preference reads them."""
    model = save_chat_model(tmp_path / "model")
    rows = [{"prompt": f"{i}+1?", "response": str(i + 1), "chosen": str(i + 1), "rejected": str(i + 2)}
            for i in range(8)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["experiment=sft", f"model.path={model}", "task=files", f"task.train={data}", "task.val_rewards={}"]
    with pytest.raises(ValueError, match=r"pairs.jsonl has chosen and rejected columns, which only signal=preference "
                                         r"reads.*task.columns.chosen=null task.columns.rejected=null"):
        build_run(compose_config(base), tmp_path / "run")
    run = build_run(compose_config([*base, "task.columns.chosen=null", "task.columns.rejected=null"]),
                    tmp_path / "run2")
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    assert "preference" not in batch and batch["response_ids"].shape[0] == 8
