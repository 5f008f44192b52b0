"""Your own model and data: a tiny chat model saved by save_pretrained, trained from JSONL,
Parquet and a saved datasets dataset through task=files; on-policy runs on prompt-only
files; and every class of bad input stopped with an error that names the file, the line
or the column."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from lightning_unified.config import build_run, train
from lightning_unified.data.files import DataError
from lightning_unified.tasks.files import FilesDataModule
from tests.lightning_helpers import compose_config
from tests.test_runs import read_metrics, run_script

QUESTIONS = [(a, b) for a in range(1, 7) for b in range(1, 5)]  # 24 questions


def chat_rows(with_response: bool = True) -> list[dict]:
    rows = []
    for a, b in QUESTIONS:
        row = {"question": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b)}
        if with_response:
            row["response"] = str(a + b)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def files_overrides(model: str, train_path: str, val_path: str, *extra: str) -> list[str]:
    return [f"model.path={model}", "task=files", f"task.train={train_path}", f"task.val={val_path}",
            "task.columns.prompt=question", "task.columns.reference=answer", "task.batch_size=4",
            "task.max_response_tokens=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1", "module.samples_every_n_steps=1", *extra]


# RL on your own data names its rewards: the built-in task's apply only to the built-in task
EXACT_MATCH_REWARD = ["signal.rewards=[{_target_: lightning_unified.specs.Reward, "
                      "fn: {_target_: lightning_unified.rewards.exact_match, _partial_: true}}]"]


def test_sft_on_a_chat_jsonl_from_the_command_line(chat_model: str, tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    val_path = write_jsonl(tmp_path / "val.jsonl", chat_rows()[:8])
    out = tmp_path / "run"
    done = run_script("experiment=sft", *files_overrides(chat_model, train_path, val_path), "logger=tensorboard",
                      f"hydra.run.dir={out}")
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows if r.get("val/exact_match")][0] == "0", "the starting policy is scored first"
    assert any(r.get("train/loss") for r in rows) and any(r.get("train/tokens_per_sec") for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["split"] == "val" and "What is" in s["prompt"] for s in samples)
    assert set(samples[0]) >= {"prompt", "completion", "reference", "exact_match"}
    # the exported policy carries its own chat tokenizer, now with a pad token
    exported = json.loads((out / "policy" / "tokenizer_config.json").read_text())
    assert exported.get("pad_token") == "<|endoftext|>"
    # TensorBoard beside metrics.csv, with the samples in its text panel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, tensors = set(), set()
    for events in (out / "tensorboard").glob("events.out.tfevents*"):  # one per validate / fit
        tags = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload().Tags()
        scalars |= set(tags["scalars"])
        tensors |= set(tags["tensors"])
    assert {"val/exact_match", "train/loss"} <= scalars
    assert any(tag.startswith("samples/val") for tag in tensors)
    # and the composed config as hyperparameters, flattened to the names an override uses
    hparams = yaml.safe_load((out / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["task.batch_size"] == 4 and hparams["model.path"] == chat_model
    # nothing on the console a user cannot act on: no note about callbacks overriding
    # callbacks at every validate and fit, no advertisement
    console = done.stdout + done.stderr
    assert "will override existing callbacks" not in console and "litlogger" not in console


@pytest.mark.parametrize("fmt", ["parquet", "saved_dataset"])
def test_parquet_and_saved_datasets(fmt: str, chat_model: str, tmp_path: Path) -> None:
    import datasets

    paths = {}
    for split, rows in (("train", chat_rows()), ("val", chat_rows()[:8])):
        table = datasets.Dataset.from_list(rows)
        if fmt == "parquet":
            paths[split] = str(tmp_path / f"{split}.parquet")
            table.to_parquet(paths[split])
        else:
            paths[split] = str(tmp_path / split)
            table.save_to_disk(paths[split])
    cfg = compose_config(["experiment=sft", *files_overrides(chat_model, paths["train"], paths["val"]),
                          "save_policy=null"])
    run = build_run(cfg, tmp_path / "run")
    assert len(run.datamodule.train_examples) == len(QUESTIONS)
    metrics = train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["val/exact_match"] <= 1.0


@pytest.mark.parametrize("experiment", ["rl", "on_policy_distill"])
def test_on_policy_runs_on_a_prompt_only_file(experiment: str, chat_model: str, chat_teacher: str,
                                              tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", chat_rows(with_response=False))
    val_path = write_jsonl(tmp_path / "val.jsonl", chat_rows(with_response=False)[:8])
    cfg = compose_config([f"experiment={experiment}", *files_overrides(chat_model, train_path, val_path),
                          f"teacher.path={chat_teacher}", "data_source.sampling.num_generations=2",
                          "save_policy=null", *(EXACT_MATCH_REWARD if experiment == "rl" else [])])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    assert any(r.get("sampling/response_length") for r in rows)
    assert any(r.get("train/objective") for r in rows)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    splits = {s["split"] for s in samples}
    assert "val" in splits
    if experiment == "rl":
        assert "train" in splits and all("reward" in s for s in samples if s["split"] == "train")


# --- the built-in task's settings stay with the built-in task --------------------------------
def test_rl_on_your_data_without_rewards_stops_before_loading_anything(tmp_path: Path) -> None:
    # neither the model directory nor the training file exists: the method is refused first
    cfg = compose_config(["task=files", f"task.train={tmp_path / 'missing.jsonl'}", f"model.path={tmp_path / 'none'}",
                          "data_source=on_policy", "signal=sparse"])
    with pytest.raises(ValueError, match=r"is RL, which needs rewards.*signal\.rewards"):
        build_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_dense_on_your_data_without_a_teacher_stops_at_start(tmp_path: Path) -> None:
    cfg = compose_config(["task=files", f"task.train={tmp_path / 'missing.jsonl'}", f"model.path={tmp_path / 'none'}",
                          "data_source=on_policy", "signal=dense"])
    # Hydra wraps the spec's ValueError, message kept, in an InstantiationException
    with pytest.raises(Exception, match=r"signal=dense needs a teacher: teacher\.path=DIR"):
        build_run(cfg, tmp_path / "run")


def test_your_data_gets_generic_defaults_not_the_addition_tasks(tmp_path: Path) -> None:
    overrides = ["task=files", "task.train=x.jsonl", "model.path=/some/model", "data_source=on_policy",
                 "signal=sparse", *EXACT_MATCH_REWARD]
    mine = compose_config(overrides)
    addition = compose_config(["data_source=on_policy", "signal=sparse"])
    # the generic defaults: the files task's batch, a fine-tuning step size, one pass over the data
    assert (mine.task.batch_size, mine.optimizer.lr, mine.trainer.max_steps, mine.trainer.max_epochs) == (8, 1e-5, -1, 1)
    assert [r.fn._target_ for r in mine.signal.rewards] == ["lightning_unified.rewards.exact_match"]
    assert mine.teacher.path is None and mine.model.path == "/some/model"
    # the built-in task keeps its tuned RL settings and rewards
    assert (addition.task.batch_size, addition.optimizer.lr, addition.trainer.max_steps) == (64, 3e-4, 700)
    assert addition.model.path.endswith("rl_start") and addition.teacher.path.endswith("teacher")
    assert [r.fn._target_.rsplit(".", 1)[1] for r in addition.signal.rewards] == ["exact_match", "digit_match"]
    # every preset on your data: nothing from the addition task's tuned files
    for experiment in ("rl", "dpo", "dft", "online_dpo", "on_policy_distill", "gkd"):
        cfg = compose_config([f"experiment={experiment}", "task=files", "task.train=x.jsonl", "model.path=/m"])
        assert cfg.model.path == "/m" and cfg.optimizer.lr == 1e-5 and cfg.trainer.max_steps == -1, experiment
        assert "digit_match" not in str(cfg.signal.get("rewards")) and cfg.teacher.path is None, experiment


# --- bad input ------------------------------------------------------------------------------


def load(tmp_path: Path, model: str, rows_or_text, **kwargs) -> FilesDataModule:
    path = tmp_path / "data.jsonl"
    if isinstance(rows_or_text, str):
        path.write_text(rows_or_text)
    else:
        write_jsonl(path, rows_or_text)
    kwargs.setdefault("columns", {"prompt": "question", "reference": "answer"})
    return FilesDataModule(train=str(path), tokenizer=model, **kwargs)


def test_malformed_json_line_names_file_line_and_column(chat_model: str, tmp_path: Path) -> None:
    good = json.dumps(chat_rows()[0])
    with pytest.raises(DataError, match=r"data\.jsonl: line 3, column \d+: malformed JSON"):
        load(tmp_path, chat_model, f"{good}\n{good}\n{{\"question\": oops}}\n{good}\n")


def test_missing_column_names_it_and_the_columns_found(chat_model: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing column 'prompt'; the file has columns \['question', 'answer', 'response'\]"):
        load(tmp_path, chat_model, chat_rows(), columns={"reference": "answer"})
    with pytest.raises(DataError, match=r"missing column 'solution' \(task.columns.reference=solution\)"):
        load(tmp_path, chat_model, chat_rows(), columns={"prompt": "question", "reference": "solution"})


@pytest.mark.parametrize("field,value,message", [
    ("question", "  ", r"line 2: column 'question' is empty"),
    ("response", "", r"line 2: column 'response' is empty"),
    ("question", [{"role": "user"}], r"line 2: column 'question', message 0 has no 'content'"),
    ("question", [{"content": "hi"}], r"line 2: column 'question', message 0 has no 'role'"),
    ("question", [], r"line 2: column 'question' is an empty list"),
])
def test_empty_or_malformed_values_name_the_line(field: str, value, message: str, chat_model: str,
                                                 tmp_path: Path) -> None:
    rows = chat_rows()[:3]
    rows[1] = {**rows[1], field: value}
    if isinstance(value, list):  # datasets needs one type per column: give every row the odd shape's type
        rows = [{**r, field: value if i == 1 else [{"role": "user", "content": "x"}]} for i, r in enumerate(rows)]
    with pytest.raises(DataError, match=message):
        load(tmp_path, chat_model, rows)


def test_overlong_examples_are_an_error_or_dropped_and_counted(chat_model: str, tmp_path: Path, caplog) -> None:
    rows = chat_rows()[:4]
    rows[2] = {**rows[2], "response": "9" * 50}
    with pytest.raises(DataError, match=r"line 3: the response has 51 tokens .* over task.max_response_tokens=8"):
        load(tmp_path, chat_model, rows, max_response_tokens=8)
    with caplog.at_level(logging.WARNING):
        data = load(tmp_path, chat_model, rows, max_response_tokens=8, overlong="drop")
    assert len(data.train_examples) == 3
    assert "dropped 1 of 4 examples" in caplog.text
    with pytest.raises(DataError, match=r"line 1: the prompt has \d+ tokens, over task.max_prompt_tokens=5"):
        load(tmp_path, chat_model, rows, max_prompt_tokens=5)


def test_a_tokenizer_without_pad_token_gets_eos_and_says_so(chat_model: str, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        data = load(tmp_path, chat_model, chat_rows())
    assert data.tokenizer.pad_token == data.tokenizer.eos_token == "<|endoftext|>"
    assert "has no pad token" in caplog.text
    assert data.tokenizer.padding_side == "left"
    # chat responses end with the template's end-of-turn token
    assert data.train_examples[0]["response_ids"][-1] == data.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_model_and_a_foreign_tokenizer_are_refused_at_start(chat_model: str, tmp_path: Path) -> None:
    # the built-in task brings its own 15-token tokenizer: it must not feed the chat model's ids
    cfg = compose_config(["experiment=sft", f"model.path={chat_model}"])
    with pytest.raises(Exception, match=r"tokenizer .* does not belong to the model at .*chat_model"):
        build_run(cfg, tmp_path)


def test_a_column_mapped_to_null_is_left_out(chat_model: str, tmp_path: Path) -> None:
    data = load(tmp_path, chat_model, chat_rows(), columns={"prompt": "question", "response": None})
    assert all("response_ids" not in e for e in data.train_examples), "prompt-only, for on-policy runs"
    with pytest.raises(DataError, match="task.columns.prompt cannot be null"):
        load(tmp_path, chat_model, chat_rows(), columns={"prompt": None})


def test_a_prompt_ending_with_an_assistant_message_is_continued(chat_model: str, tmp_path: Path) -> None:
    """A prefill: the assistant's last message stays open (no end of turn after it, no second
    assistant header), and the reply continues it, as TRL renders such a prompt."""
    rows = chat_rows()
    prefilled = [{**r, "question": r["question"] + [{"role": "assistant", "content": f"{a} + {b} = "}]}
                 for r, (a, b) in zip(rows, QUESTIONS)]
    plain = load(tmp_path, chat_model, rows, columns={"prompt": "question", "response": None}).train_examples
    data = load(tmp_path, chat_model, prefilled, columns={"prompt": "question", "response": None})
    tokenizer = data.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(data.train_examples) == len(plain) == len(QUESTIONS)
    for (a, b), example, without in zip(QUESTIONS, data.train_examples, plain):
        ids, start = example["prompt_ids"], without["prompt_ids"]
        assert ids[: len(start)] == start, "the question and the assistant's header, as without the prefill"
        assert tokenizer.decode(ids[len(start):]) == f"{a} + {b} = "
        assert end_of_turn not in ids[len(start):]


# --- every reader keeps the file's strings ------------------------------------------------------
def test_a_gzipped_jsonl_is_read_and_its_bad_lines_named(tmp_path: Path) -> None:
    import gzip

    from lightning_unified.data.files import read_table

    good = tmp_path / "train.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n\n")
        f.write(json.dumps({"prompt": "What is 3+3?", "response": "6"}) + "\n")
    assert [r["response"] for r in read_table(good)] == ["4", "6"]
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: line 2, column 2: malformed JSON"):
        read_table(bad)


def test_csv_cells_stay_the_files_text(tmp_path: Path) -> None:
    """A CSV has no types: 052 stays 052 (not 52), a numeric column is text, an empty cell
    is an empty string (not a missing value)."""
    from lightning_unified.data.files import read_table

    path = tmp_path / "train.csv"
    path.write_text("\ufeffprompt,response,reference\nWhat is 07+45?,052,052\nWhat is 1.50 + 0?,1.50,\n", encoding="utf-8")
    rows = list(read_table(path))
    assert rows == [{"prompt": "What is 07+45?", "response": "052", "reference": "052"},
                    {"prompt": "What is 1.50 + 0?", "response": "1.50", "reference": ""}]
