"""A callback for subprocess runs: each rank appends its sampled batch's width per step."""

from __future__ import annotations

import json

import lightning as L

from lightning_unified import batch as fields


class RecordWidths(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "width": batch[fields.RESPONSE_IDS].shape[1]}) + "\n")
