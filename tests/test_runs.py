"""Whole runs through the Hydra entry point: every preset with fast_dev_run, the 2x2 sweep
from the command line, DDP on two CPU processes, and resuming a run from its checkpoint."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unified.config import train
from tests.lightning_helpers import FAST_TASK, compose_config
from tests.test_configs import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run_script(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# trainer configs whose strategy starts processes of its own (Lightning re-launches the script)
MULTI_PROCESS_TRAINERS = ("ddp", "ddp_spawn", "fsdp2_cpu")


def train_in_its_layout(overrides: list[str], out: Path) -> None:
    """A run under a multi-process trainer goes through the script in processes of its own;
    any other runs in this process, saving a start of Python, Lightning and transformers."""
    if any(o in overrides for o in (f"trainer={t}" for t in MULTI_PROCESS_TRAINERS)):
        run_script(*overrides, f"hydra.run.dir={out}")
    else:
        train(compose_config(overrides), out)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}", "trainer.fast_dev_run=true", *FAST_TASK])
    metrics = train(cfg, tmp_path)
    # a reward model is judged by its held-out pairs, a policy by its answers
    headline = "val/pair_accuracy" if experiment == "reward_model" else "val/exact_match"
    assert 0.0 <= metrics[headline] <= 1.0
    assert (tmp_path / "policy" / "config.json").is_file(), "the trained policy is saved in HF format"


def test_two_by_two_sweep_from_the_command_line(tmp_path: Path) -> None:
    done = run_script("-m", "data_source=off_policy,on_policy", "signal=sparse,dense", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", *FAST_TASK, f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["0_off_policy_sparse", "1_off_policy_dense", "2_on_policy_sparse", "3_on_policy_dense"], runs
    for run in runs:
        rows = read_metrics(tmp_path / run / "metrics.csv")
        scores = [r for r in rows if r.get("val/exact_match")]
        assert scores[0]["step"] == "0", f"{run}: the starting policy is scored first"
        assert any(r.get("train/loss") for r in rows), f"{run}: no training loss logged"
    assert "val/exact_match" in done.stdout
    # the comparison report of the sweep: a table and a picture from the runs' metrics.csv
    out = tmp_path / "report"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path), "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    report = (out / "comparison.md").read_text().splitlines()
    assert len(report) == 2 + 2 + 4, report
    assert any("on_policy x dense" in line for line in report)
    assert all(line.count("|") == 8 for line in report[2:])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ddp_two_cpu_processes_on_policy(tmp_path: Path) -> None:
    # multirun under DDP: Lightning re-launches the script per rank inside the sweep's job dir
    # validation samples 2 answers per prompt too, each rank its own prompts, in lockstep
    run_script("-m", "experiment=rl", "trainer=ddp", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
               "data_source.sampling.num_generations=2", "validation.num_samples=2", *FAST_TASK,
               f"hydra.sweep.dir={tmp_path}")
    (job,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_metrics(job / "metrics.csv")
    assert any(r.get("reward/reward_mean") for r in rows) and any(r.get("importance/ess") for r in rows)
    sampled = [r for r in rows if r.get("val/pass@2")]
    assert sampled and all(float(r["val/pass@2"]) >= float(r["val/mean@2"]) for r in sampled)
    assert max(int(r["step"]) for r in rows) >= 2
    assert (job / "policy" / "config.json").is_file()


def test_ddp_spawn_pickles_the_whole_pipeline(tmp_path: Path) -> None:
    # ddp_spawn pickles the module into each process: specs, reward partials, tokenizer, teacher path
    run_script("experiment=gkd", "trainer=ddp_spawn", "trainer.max_steps=3", "trainer.val_check_interval=3",
               "trainer.log_every_n_steps=1", "save_policy=null", *FAST_TASK, f"hydra.run.dir={tmp_path}")
    rows = read_metrics(tmp_path / "metrics.csv")
    assert any(r.get("train/objective") for r in rows) and any(r.get("sampling/on_policy") for r in rows)


def test_resume_from_last_checkpoint(tmp_path: Path) -> None:
    common = ["experiment=on_policy_distill", "checkpoint_every_n_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
              "save_policy=null", *FAST_TASK]
    train(compose_config([*common, "trainer.max_steps=4"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # the run continued to 6 steps from its checkpoint, in the same directory: the first
    # run's metrics must survive (Lightning's own CSV writer deletes them)
    train(compose_config([*common, "trainer.max_steps=6", f"ckpt_path={last}"]), tmp_path)
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "metrics.csv") if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5], steps
