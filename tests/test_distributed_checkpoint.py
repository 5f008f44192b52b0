"""FSDP2's presets write distributed checkpoints (each rank its shards, nothing gathered on
rank 0), and a run stopped after its step-2 checkpoint resumes from them with resume=true
to the same losses as a run that never stopped: 2 CPU processes, trainer=fsdp2_cpu. The
stopped run's export at step 2, and scripts/export.py on its distributed checkpoint, give
the module's logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from tests.test_runs import ROOT, read_metrics

STEPS = 4
COMMON = ["experiment=sft", "trainer=fsdp2_cpu", f"trainer.max_steps={STEPS}", "checkpoint_every_n_steps=2",
          "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "save_policy=null", "task.num_train=64",
          "task.num_val=8", "task.batch_size=8", "task.val_batch_size=8"]


class StopAfter(L.Callback):
    """Ends fit after optimizer step ``step`` (its checkpoint written), as a preempted job would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run_script(*overrides: str) -> None:
    """scripts/train.py in processes of its own, importing this checkout (and this module's
    callback) first."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run_dir / "metrics.csv") if r.get("train/loss")}


def test_fsdp2_resumes_from_its_distributed_checkpoint(tmp_path: Path) -> None:
    run_script(*COMMON, f"hydra.run.dir={tmp_path / 'whole'}")
    stopped = tmp_path / "stopped"
    run_script(*COMMON, "callbacks=[{_target_:tests.test_distributed_checkpoint.StopAfter,step:2}]",
               f"hydra.run.dir={stopped}")
    last = stopped / "checkpoints" / "last.ckpt"
    # a directory of shards (one file per rank) and the run's state beside them, linked as last.ckpt
    assert last.is_symlink() and last.is_dir(), sorted(p.name for p in last.parent.iterdir())
    assert len(list(last.glob("*.distcp"))) == 2
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2
    assert max(losses(stopped)) == 1, "stopped after step 2 (rows 0 and 1)"
    check_exports_at_step_2(stopped, tmp_path)

    run_script(*COMMON, "resume=true", f"hydra.run.dir={stopped}")
    # every checkpoint's export, the newest one kept (export_keep: 1)
    assert sorted(p.name for p in (tmp_path / "whole" / "exports").iterdir()) == ["step_4"]
    whole, resumed = losses(tmp_path / "whole"), losses(stopped)
    assert sorted(resumed) == sorted(whole) == list(range(STEPS))
    for step in whole:
        assert abs(resumed[step] - whole[step]) <= 1e-6, (step, resumed[step], whole[step])


def check_exports_at_step_2(run_dir: Path, tmp_path: Path) -> None:
    """The policy the 2-process run exported at step 2 (gathered from both ranks' shards),
    and scripts/export.py's conversion of the step-2 distributed checkpoint in one process,
    give the logits of the module restored from torch's own conversion of that checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from tests.test_export import export_script, logits, module_at, prompts

    last = run_dir / "checkpoints" / "last.ckpt"
    dcp_to_torch_save(last, tmp_path / "converted.pt")
    one_process = [o if o != "trainer=fsdp2_cpu" else "trainer=cpu" for o in COMMON]
    run = module_at(tmp_path / "converted.pt", one_process, tmp_path / "reference")
    inputs = prompts(run)
    want = logits(run.module.policy, inputs)
    export_script(last, tmp_path / "exported")
    for directory in (run_dir / "exports" / "step_2", tmp_path / "exported"):
        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(directory), inputs), want,
                                   rtol=0, atol=1e-6)
