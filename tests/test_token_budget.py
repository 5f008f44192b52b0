"""Token-budget micro-batches (task.max_tokens_per_batch): each training batch is filled to
a number of tokens instead of a number of examples, every example is trained on once per
epoch, and an optimizer step's gradient is that of all its micro-batches' tokens, on one
process or two."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from transformers import AutoModelForCausalLM

from lightning_unified import batch as F
from lightning_unified.config import build_run, train
from lightning_unified.data.files import DataError
from lightning_unified.data.token_budget import example_tokens, token_budget_batches
from tests.lightning_helpers import compose_config, quiet_trainer, save_chat_model
from tests.test_runs import train_in_its_layout

BUDGET = 160


def test_batches_fill_to_the_budget_and_hold_every_example_once() -> None:
    rng = random.Random(0)
    costs = [rng.randint(1, 60) for _ in range(200)]
    batches = token_budget_batches(costs, 100, 8, shuffle=True, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(200)), "every example, exactly once"
    for b, nxt in zip(batches, batches[1:]):
        assert sum(costs[i] for i in b) <= 100 and len(b) <= 8
        # a batch closes only when its next example would not fit, or it is full
        assert sum(costs[i] for i in b) + costs[nxt[0]] > 100 or len(b) == 8
    assert len({len(b) for b in batches}) > 2, "short examples share a batch with more of them"
    assert token_budget_batches(costs, 100, 8, shuffle=True, seed=3) == batches, "the seed fixes the batches"
    assert token_budget_batches(costs, 100, 8, shuffle=True, seed=4) != batches
    in_order = token_budget_batches(costs, 100, 8, shuffle=False)
    assert [i for b in in_order for i in b] == list(range(200)), "unshuffled: the file's order"


def test_what_an_example_costs() -> None:
    assert example_tokens({"prompt_ids": [1] * 5, "response_ids": [2] * 7}, 64) == 12
    assert example_tokens({"prompt_ids": [1] * 5}, 64) == 69, "a prompt to sample from: its longest reply"
    assert example_tokens({"prompt_ids": [1] * 5, "chosen_ids": [2] * 3, "rejected_ids": [3] * 4}, 64) == 17


@pytest.fixture(scope="module")
def ragged_task(tmp_path_factory) -> list[str]:
    """A chat model and data whose examples differ about fivefold in length."""
    directory = tmp_path_factory.mktemp("budget")
    model = save_chat_model(directory / "model")
    rows = []
    for i in range(24):
        question = "What is " + "1+" * (1 + (i * 7) % 12) + "1?"
        answer = str(2 + (i * 7) % 12)
        rows.append({"prompt": question, "response": answer + " " + "ok " * (i % 9), "reference": answer})
    for name in ("train", "val"):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"model.path={model}", "task=files", f"task.train={directory / 'train.jsonl'}",
            f"task.val={directory / 'val.jsonl'}", "task.max_response_tokens=64", "experiment=sft",
            "task.columns.chosen=null", "task.columns.rejected=null"]


class KeepBatches:
    def __init__(self) -> None:
        import lightning as L

        batches = self.batches = []

        class Keep(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

        self.callback = Keep()


def test_a_run_trains_on_batches_filled_to_the_budget(ragged_task, tmp_path: Path) -> None:
    cfg = compose_config([*ragged_task, f"task.max_tokens_per_batch={BUDGET}", "task.batch_size=16",
                          "module.packing=true"])
    run = build_run(cfg, tmp_path)
    steps = len(run.datamodule.budget_batches)
    keep = KeepBatches()
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[keep.callback]).fit(run.module,
                                                                                      datamodule=run.datamodule)
    tokens = [int(b[F.PROMPT_MASK].sum() + b[F.RESPONSE_MASK].sum()) for b in keep.batches]
    sizes = [len(b[F.EXAMPLE_INDEX]) for b in keep.batches]
    assert all(t <= BUDGET for t in tokens), tokens
    assert len(set(sizes)) > 1, f"batches of long examples hold fewer: {sizes}"
    seen = sorted(int(i) for b in keep.batches for i in b[F.EXAMPLE_INDEX])
    assert seen == list(range(24)), "one epoch: every example once"
    assert max(tokens) > BUDGET * 0.6, f"batches are filled: {tokens}"


def test_an_example_over_the_budget_is_named(ragged_task, tmp_path: Path) -> None:
    # Hydra wraps the data module's DataError, message kept, in an InstantiationException
    with pytest.raises(InstantiationException, match=r"train\.jsonl, line 2: the example has 32 tokens, over "
                                                     r"task\.max_tokens_per_batch=20"):
        build_run(compose_config([*ragged_task, "task.max_tokens_per_batch=20"]), tmp_path)
    with pytest.raises(DataError, match=r"data\.jsonl, line 7: the example has 40 tokens"):
        token_budget_batches([10] * 6 + [40], 20, where=lambda i: f"data.jsonl, line {i + 1}")


def _trained(ragged_task, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """The policy after two SGD steps."""
    overrides = [*ragged_task, "task.shuffle=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "trainer.log_every_n_steps=1", "optimizer=sgd", "trainer.gradient_clip_val=null", "scheduler=constant",
                 "module.samples_every_n_steps=null", "validate_first=false", "+trainer.limit_val_batches=0", *overrides]
    train_in_its_layout(overrides, out)
    return AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()


def test_a_step_of_budget_micro_batches_gives_their_whole_gradient_on_one_process_or_two(ragged_task,
                                                                                          tmp_path: Path) -> None:
    """Unshuffled, two ranks take the budget batches alternately: one process accumulating
    two micro-batches per step sees the same tokens per step. Micro-batches of different
    sizes and token counts must give the same update (the normaliser spans them all)."""
    budget = [f"task.max_tokens_per_batch={BUDGET}", "task.batch_size=16"]
    one = _trained(ragged_task, tmp_path / "one", *budget, "trainer.accumulate_grad_batches=2")
    two = _trained(ragged_task, tmp_path / "ddp", *budget, "trainer=ddp")
    start = AutoModelForCausalLM.from_pretrained(ragged_task[0].split("=", 1)[1]).state_dict()
    assert any(not torch.equal(one[k], start[k]) for k in one), "the run must move the policy"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("batching", ["examples", "token budget"])
def test_killed_and_resumed_on_files_equals_uninterrupted(batching: str, ragged_task, tmp_path: Path) -> None:
    """task=files, shuffled, over more than one epoch (trainer.max_epochs counts them, so
    the schedule's length needs the loader's length before the checkpoint is restored):
    the resumed run reads the batches the uninterrupted one read, in the same order, from
    the step it stopped at. (It once started its epoch over in a new order.)"""
    from tests.test_resume import kill_after_step_2, rows

    batches = ([f"task.max_tokens_per_batch={BUDGET}", "task.batch_size=16", "module.packing=true"]
               if batching == "token budget" else ["task.batch_size=8"])
    common = [*ragged_task, *batches, "trainer.max_epochs=3", "trainer.max_steps=8", "checkpoint_every_n_steps=2",
              "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "save_policy=null",
              "task.val_batch_size=24"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(compose_config(common), whole)
    kill_after_step_2(common, killed)
    train(compose_config([*common, "resume=true"]), killed)
    losses = {"whole": rows(whole), "resumed": rows(killed)}
    assert [(s, k) for s, k, _ in losses["resumed"]] == [(s, k) for s, k, _ in losses["whole"]]
    for (step, key, a), (_, _, b) in zip(losses["resumed"], losses["whole"]):
        assert abs(a - b) <= 1e-6, f"step {step} {key}: resumed {a} against {b}"
    steps = [s for s, k, _ in losses["whole"] if k == "train/loss"]
    per_epoch = len(build_run(compose_config(common), tmp_path / "count").datamodule.train_dataloader())
    assert steps[-1] == 7 and per_epoch < 8, f"the run crosses an epoch boundary ({per_epoch} batches an epoch)"
