"""Flags that mean what they say: ``trainer.max_steps`` is the run's length whatever the
epochs (the data loops as often as the steps take), and the schedule, the run's first line
and the progress bar all count the optimizer steps that run, accumulation included."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from lightning_unified.config import build_run, describe_method, train
from tests.lightning_helpers import compose_config

# 64 problems in batches of 4: 16 batches an epoch
SIXTEEN_BATCHES = ["task.num_train=64", "task.batch_size=4", "task.num_val=8", "task.val_batch_size=8"]


class RecordTheEnd(L.Callback):
    """What the fit ran: its training batches and their epochs, its optimizer steps, and the
    schedule's place and rate at the end."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        RecordTheEnd.seen = {"batches": 0, "epochs": set()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RecordTheEnd.seen["batches"] += 1
        RecordTheEnd.seen["epochs"].add(trainer.current_epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        RecordTheEnd.seen.update(global_step=trainer.global_step, schedule_step=scheduler.last_epoch,
                                 lr=scheduler.get_last_lr()[0])


def test_max_steps_runs_its_steps_across_epochs(tmp_path: Path, caplog, capsys) -> None:
    """``max_steps=20`` with 2 micro-batches a step on 16 batches: 40 batches, 2.5 epochs.
    Before, the trainer's ``max_epochs: 1`` stopped it after 8 steps while the first line said
    20 steps, the schedule ran for 20 and the progress bar titled it ``Epoch 0/-2``."""
    cfg = compose_config(["experiment=sft", *SIXTEEN_BATCHES, "trainer.max_epochs=1", "trainer.max_steps=20",
                          "trainer.accumulate_grad_batches=2", "scheduler.num_warmup_steps=0", "validate_first=false",
                          "trainer.val_check_interval=20", "save_policy=null", "checkpoint_every_n_steps=100",
                          "callbacks=[{_target_: tests.test_flags.RecordTheEnd}]"])
    with caplog.at_level(logging.INFO, logger="lightning_unified.config"):
        train(cfg, tmp_path)
    seen = RecordTheEnd.seen
    assert seen["global_step"] == 20 and seen["batches"] == 40 and seen["epochs"] == {0, 1, 2}, seen
    assert seen["schedule_step"] == 20 and seen["lr"] == 0.0, f"the cosine schedule ends with the run: {seen}"
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("method:"))
    assert "| 20 steps |" in first, first
    bar = capsys.readouterr().out
    assert "step 20/20" in bar and "Epoch" not in bar, bar[-2000:]


def test_the_first_line_counts_an_epoch_run_in_optimizer_steps(tmp_path: Path) -> None:
    """2 epochs of 16 batches, 3 micro-batches a step: Lightning steps on each epoch's last
    batch, so 6 steps an epoch (ceil(16 / 3)), 12 in all; the schedule counts the same."""
    cfg = compose_config(["experiment=sft", *SIXTEEN_BATCHES, "trainer.max_steps=-1", "trainer.max_epochs=2",
                          "trainer.accumulate_grad_batches=3"])
    run = build_run(cfg, tmp_path)
    assert "| 12 steps |" in describe_method(cfg, run)
    assert run.trainer.max_epochs == 2, "without max_steps the epochs stay the config's"
