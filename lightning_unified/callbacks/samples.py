"""What a run shows: a few prompts, completions and rewards, every N steps, in
``<log dir>/samples.jsonl``, and in each logger that shows them: a table under W&B and
MLflow, the text panel under TensorBoard (:func:`lightning_unified.loggers.log_samples`)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from typing_extensions import override

from lightning_unified import batch as fields
from lightning_unified.loggers import log_samples
from lightning_unified.rewards.scoring import decode_prompts


class SampleLog(L.Callback):
    """Training samples come from batches that were sampled and rewarded (they carry
    ``completions``); validation samples are the first greedy completions of each
    validation. Written on global rank 0 only, and only when the trainer has a log dir."""

    def __init__(self, every_n_steps: int = 50, num_samples: int = 4):
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"samples: every_n_steps and num_samples must be >= 1, got {every_n_steps}, {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self._last_step = -1

    @staticmethod
    def _directory(trainer: L.Trainer) -> str | None:
        # the logger's own directory: trainer.log_dir would broadcast, a collective that only rank 0 reaches here
        return getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None

    def _write(self, trainer: L.Trainer, split: str, prompts, completions, references, scores: dict) -> None:
        directory = self._directory(trainer) if trainer.is_global_zero else None
        if directory is None:
            return
        rows = []
        for i in range(min(self.num_samples, len(completions))):
            rows.append({"step": trainer.global_step, "split": split, "prompt": prompts[i],
                         "completion": completions[i], "reference": references[i] if references else None,
                         **{name: float(values[i]) for name, values in scores.items()}})
        path = Path(directory) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        log_samples(trainer.loggers, split, rows, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step this batch belonged to; Lightning has counted it already
        if fields.COMPLETIONS not in batch or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        scores = {"reward": batch[fields.REWARDS].tolist()} if fields.REWARDS in batch else {}
        if fields.FAILED in batch:  # 1: the row failed (its reward is no score), out of the loss
            scores["failed"] = batch[fields.FAILED].tolist()
        self._write(trainer, "train", decode_prompts(pl_module.tokenizer, batch), batch[fields.COMPLETIONS],
                    batch.get(fields.REFERENCES), scores)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and isinstance(outputs, dict) and "completions" in outputs:
            self._write(trainer, "val", outputs["prompts"], outputs["completions"], batch.get(fields.REFERENCES),
                        outputs["scores"])
