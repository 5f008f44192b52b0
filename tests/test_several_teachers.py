"""Several teachers in one run (``signal.teachers``): each example is scored by the teacher
its data's teacher column names, exactly as that teacher alone would score it; each
teacher's objective is logged; and names that do not match are stopped by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.config import describe_method, build_run, train
from lightning_unified.losses.teacher_logits import RoutedTeacherLogits, TeacherLogits
from lightning_unified.models.loading import load_causal_lm
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Dense, OffPolicy
from lightning_unified.tasks.files import FilesDataModule
from tests.lightning_helpers import compose_config, save_chat_model
from tests.test_files_task import chat_rows, files_overrides, write_jsonl
from tests.test_runs import read_metrics

NAMES = ["math", "code"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("several_teachers")
    # teachers of different widths: each row must be read through its own teacher's head
    return {"policy": save_chat_model(root / "policy"), "math": save_chat_model(root / "math", seed=7),
            "code": save_chat_model(root / "code", seed=11, hidden_size=96, intermediate_size=192)}


def routed_rows(teacher_of=lambda i: NAMES[i % 3 == 0]) -> list[dict]:
    """The chat questions, every third one for the code teacher, the rest for the math one."""
    return [{**row, "teacher": teacher_of(i)} for i, row in enumerate(chat_rows())]


def datamodule(models: dict, path: str, batch_size: int = 8) -> FilesDataModule:
    return FilesDataModule(train=path, tokenizer=models["policy"], columns={"prompt": "question"},
                           batch_size=batch_size, max_response_tokens=8, shuffle=False)


def teachers(models: dict) -> dict:
    return {name: {"path": models[name]} for name in NAMES}


def scored(signal: Dense, models: dict, batch: dict, data=None) -> dict:
    """``batch`` with the fields ``signal``'s teacher callback adds."""
    module = UnifiedModule(models["policy"], models["policy"], OffPolicy(), signal)
    callback = TeacherStage(signal)
    callback.setup(SimpleNamespace(datamodule=data), module, "fit")
    callback.on_fit_start(None, module)
    batch = dict(batch)
    callback.run(None, module, batch, 0)
    return batch


def test_routed_teacher_logits_read_each_row_through_its_own_head() -> None:
    torch.manual_seed(0)
    vocab, width = 30, 5
    parts = [(torch.tensor([0, 3]), TeacherLogits(hidden=torch.randn(2, width, 8), head_weight=torch.randn(vocab, 8),
                                                  temperature=1.5)),
             (torch.tensor([2, 1, 4]), TeacherLogits(hidden=torch.randn(3, width, 12),
                                                     head_weight=torch.randn(vocab, 12), head_bias=torch.randn(vocab),
                                                     temperature=1.5))]
    routed = RoutedTeacherLogits.from_rows(parts, rows=5)
    expected = torch.zeros(5, width, vocab)
    for index, teacher in parts:
        logits = teacher.hidden @ teacher.head_weight.T + (0 if teacher.head_bias is None else teacher.head_bias)
        expected[index] = torch.log_softmax(logits / 1.5, -1)
    flat = routed.flattened(torch.Size([5, width]))
    torch.testing.assert_close(flat.log_probs(0, 5 * width), expected.reshape(-1, vocab))
    # a chunk, a mini-batch of rows and a selection of tokens read the same
    torch.testing.assert_close(flat.log_probs(7, 13), expected.reshape(-1, vocab)[7:13])
    torch.testing.assert_close(routed.rows(1, 3).flattened(torch.Size([2, width])).log_probs(0, 2 * width),
                               expected[1:3].reshape(-1, vocab))
    keep = torch.tensor([0, 6, 11, 24])
    torch.testing.assert_close(flat.select(keep).log_probs(0, 4), expected.reshape(-1, vocab)[keep])


@pytest.mark.parametrize("signal", [dict(divergence="forward_kl"), dict(divergence="forward_kl", top_k=4),
                                    dict(divergence="sampled_reverse_kl")],
                         ids=["exact", "top_k", "sampled_token"])
def test_each_row_is_scored_by_the_teacher_its_data_names(models: dict, tmp_path: Path, signal: dict) -> None:
    data = datamodule(models, write_jsonl(tmp_path / "train.jsonl", routed_rows()))
    batch = next(iter(data.train_dataloader()))
    assert batch[F.TEACHER_NAMES] == [NAMES[i % 3 == 0] for i in range(8)]
    routed = scored(Dense(teachers=teachers(models), **signal), models, batch, data)
    assert routed[F.TEACHER_INDEX].tolist() == [NAMES.index(n) for n in batch[F.TEACHER_NAMES]]
    mask = batch[F.RESPONSE_MASK].bool()
    for position, name in enumerate(NAMES):
        alone = scored(Dense(teacher=models[name], **signal), models, batch)  # this teacher on every row
        rows = routed[F.TEACHER_INDEX] == position
        if "top_k" in signal:
            assert torch.equal(routed[F.TEACHER_TOPK_IDS][rows][mask[rows]], alone[F.TEACHER_TOPK_IDS][rows][mask[rows]])
            torch.testing.assert_close(routed[F.TEACHER_TOPK_LOGP][rows], alone[F.TEACHER_TOPK_LOGP][rows])
        elif signal["divergence"] == "sampled_reverse_kl":
            torch.testing.assert_close(routed[F.TEACHER_TOKEN_LOGP][rows], alone[F.TEACHER_TOKEN_LOGP][rows])
        else:
            shape = batch[F.RESPONSE_IDS].shape
            tokens = shape[0] * shape[1]
            got = routed[F.TEACHER].flattened(shape).log_probs(0, tokens).reshape(*shape, -1)
            want = alone[F.TEACHER].flattened(shape).log_probs(0, tokens).reshape(*shape, -1)
            torch.testing.assert_close(got[rows], want[rows], atol=1e-6, rtol=1e-5)
            assert (got[rows] - want[rows]).abs().max() < (got[~rows] - want[~rows]).abs().max(), \
                "the other teacher's rows differ: the two teachers are different models"


def test_on_policy_distillation_from_two_teachers_logs_each_ones_objective(models: dict, tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", routed_rows())
    val_path = write_jsonl(tmp_path / "val.jsonl", chat_rows()[:8])
    math, code = models["math"], models["code"]
    cfg = compose_config(["experiment=on_policy_distill", *files_overrides(models["policy"], train_path, val_path),
                          f"signal.teachers={{math: {{path: {math}}}, code: {{path: {code}}}}}",
                          "data_source.sampling.num_generations=2", "trainer.max_steps=3", "save_policy=null"])
    run = build_run(cfg, tmp_path / "built")
    assert f"teachers math={math}, code={code}" in describe_method(cfg, run)
    train(cfg, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r.get("train/objective")]
    assert len(rows) == 3
    for row in rows:
        each = [float(row[f"train/objective/{name}"]) for name in NAMES]
        assert all(value > 0 for value in each), row  # a KL from a different model
        # token_mean: the step's objective is the teachers' objectives weighted by their tokens
        assert min(each) - 1e-6 <= float(row["train/objective"]) <= max(each) + 1e-6, row


def test_two_teachers_on_two_processes_give_the_single_process_update(models: dict, tmp_path: Path) -> None:
    """On-policy distillation from two teachers of different widths: one process with
    batches of 8, and two (DDP, FSDP2) with 4 each, make the same updates and log the same
    per-teacher objectives. Rows are dealt to the ranks alternately, so each rank scores its
    own mix of the two teachers' rows; greedy sampling gives every layout the same replies."""
    from transformers import AutoModelForCausalLM

    from tests.test_runs import train_in_its_layout

    train_path = write_jsonl(tmp_path / "train.jsonl", routed_rows())
    val_path = write_jsonl(tmp_path / "val.jsonl", chat_rows()[:8])
    teachers_override = f"signal.teachers={{math: {{path: {models['math']}}}, code: {{path: {models['code']}}}}}"
    policies, objectives = {}, {}
    for layout, batch_size in (("cpu", 8), ("ddp", 4), ("fsdp2_cpu", 4)):
        out = tmp_path / layout
        overrides = ["experiment=on_policy_distill", *files_overrides(models["policy"], train_path, val_path),
                     teachers_override, f"trainer={layout}", f"task.batch_size={batch_size}", "task.shuffle=false",
                     "data_source.sampling.num_generations=2", "data_source.sampling.top_k=1",
                     "data_source.sampling.max_new_tokens=4", "optimizer=sgd", "optimizer.lr=0.5",
                     "trainer.gradient_clip_val=null", "scheduler=constant", "module.samples_every_n_steps=null"]
        train_in_its_layout(overrides, out)
        policies[layout] = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
        objectives[layout] = [[float(r[f"train/objective/{name}"]) for name in NAMES]
                              for r in read_metrics(out / "metrics.csv") if r.get("train/objective")]
    start = AutoModelForCausalLM.from_pretrained(models["policy"]).state_dict()
    assert any(not torch.equal(policies["cpu"][k], start[k]) for k in start), "the run must move the policy"
    assert len(objectives["cpu"]) == 2 and all(v > 0 for row in objectives["cpu"] for v in row)
    for layout in ("ddp", "fsdp2_cpu"):
        for key, value in policies["cpu"].items():
            torch.testing.assert_close(policies[layout][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key, layout=layout: f"{layout} {key}: {m}")
        torch.testing.assert_close(torch.tensor(objectives[layout]), torch.tensor(objectives["cpu"]), rtol=1e-4,
                                   atol=1e-6, msg=lambda m, layout=layout: f"{layout} per-teacher objectives: {m}")


def test_a_teacher_the_run_does_not_have_is_named_with_its_line(models: dict, tmp_path: Path) -> None:
    rows = routed_rows()
    rows[5]["teacher"] = "physics"
    data = datamodule(models, write_jsonl(tmp_path / "train.jsonl", rows))
    with pytest.raises(ValueError, match=r"train.jsonl, line 6: teacher 'physics' is not one of signal.teachers "
                                         r"\['math', 'code'\]"):
        scored(Dense(teachers=teachers(models)), models, next(iter(data.train_dataloader())), data)


def test_data_naming_teachers_is_refused_by_a_run_of_one_teacher(models: dict, tmp_path: Path) -> None:
    data = datamodule(models, write_jsonl(tmp_path / "train.jsonl", routed_rows()))
    with pytest.raises(ValueError, match=r"train.jsonl, line 1: the training data names each example's teacher .* "
                                         r"this run has one teacher; .*task.columns.teacher=null"):
        scored(Dense(teacher=models["math"]), models, next(iter(data.train_dataloader())), data)
    # the column switched off: the one teacher scores every row
    data = FilesDataModule(train=data.train_path, tokenizer=models["policy"],
                           columns={"prompt": "question", "teacher": None}, max_response_tokens=8)
    batch = next(iter(data.train_dataloader()))
    assert F.TEACHER_NAMES not in batch
    assert F.TEACHER in scored(Dense(teacher=models["math"]), models, batch, data)


def test_a_routed_batch_without_teacher_names_says_which_column(models: dict, tmp_path: Path) -> None:
    data = datamodule(models, write_jsonl(tmp_path / "train.jsonl", chat_rows()))
    with pytest.raises(KeyError, match=r"signal.teachers \['math', 'code'\] .*task.columns.teacher=COLUMN"):
        scored(Dense(teachers=teachers(models)), models, next(iter(data.train_dataloader())), data)


@pytest.mark.parametrize("settings, message", [
    (dict(teacher="/a/teacher"), r"signal.teachers names the teachers \(math, code\); the one teacher's "
                                 r"teacher.path='/a/teacher' cannot be set beside it"),
    (dict(teachers={"math": {"path": "/m", "temperature": 2}}), r"signal.teachers.math has unknown key\(s\) "
                                                                r"\['temperature'\]"),
    (dict(teachers={"math": {"path": "self"}}), r"signal.teachers.math.path=self: self-distillation has one teacher"),
    (dict(teachers={"math": {"engine": "server"}}), r"signal.teachers.math.engine=server .* set signal.teachers.math.url"),
    (dict(teachers={"math": {"engine": "server", "url": "http://127.0.0.1:1"}}, divergence="reverse_kl"),
     r"signal.teachers.math.engine=server returns the teacher's top-k"),
    (dict(teachers={"math": {}}), r"signal.teachers.math.engine=hf loads the model from a local Hugging Face "
                                  r"directory: set signal.teachers.math.path"),
])
def test_bad_teachers_are_named(settings: dict, message: str) -> None:
    settings.setdefault("teachers", {"math": {"path": "/m"}, "code": {"path": "/c"}})
    with pytest.raises(ValueError, match=message):
        Dense(**settings)


def test_the_teacher_column_is_read_and_checked(models: dict, tmp_path: Path) -> None:
    rows = routed_rows()
    rows[2]["teacher"] = " "
    with pytest.raises(ValueError, match=r"train.jsonl, line 3: column 'teacher' is empty"):
        datamodule(models, write_jsonl(tmp_path / "train.jsonl", rows))
    data = datamodule(models, write_jsonl(tmp_path / "ok.jsonl", routed_rows()))
    assert data.teacher_names() == {"code": f"{tmp_path / 'ok.jsonl'}, line 1", "math": f"{tmp_path / 'ok.jsonl'}, line 2"}


def test_one_teacher_given_by_name_is_routed_by_the_data(models: dict, tmp_path: Path) -> None:
    data = datamodule(models, write_jsonl(tmp_path / "train.jsonl", routed_rows(lambda i: "math")))
    batch = next(iter(data.train_dataloader()))
    routed = scored(Dense(teachers={"math": {"path": models["math"]}}, top_k=4), models, batch, data)
    alone = scored(Dense(teacher=models["math"], top_k=4), models, batch)
    assert routed[F.TEACHER_INDEX].tolist() == [0] * 8
    torch.testing.assert_close(routed[F.TEACHER_TOPK_LOGP], alone[F.TEACHER_TOPK_LOGP])
