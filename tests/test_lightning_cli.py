"""``python -m lightning_unified.cli fit --config run.yaml``: LightningCLI trains the module
from a YAML file without Hydra, on the real specs (``Dense`` takes other arguments than its
fields), and the same method gives the same losses as the Hydra run."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from lightning_unified.cli import Policy, UnifiedCLI
from lightning_unified.config import train
from lightning_unified.models import build_policy
from tests.lightning_helpers import compose_config
from tests.test_runs import ROOT, read_metrics

EXAMPLE = ROOT / "examples" / "lightning_cli" / "sft.yaml"
STEPS = 3


def losses(rows: list[dict]) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_the_example_trains_as_the_hydra_run_does(tmp_path: Path) -> None:
    """The example YAML is experiment=sft on the built-in task: the same first losses."""
    small = {"num_train": 64, "batch_size": 8, "num_val": 8, "val_batch_size": 8}
    train(compose_config(["experiment=sft", *(f"task.{k}={v}" for k, v in small.items()), f"trainer.max_steps={STEPS}",
                          "trainer.log_every_n_steps=1", "save_policy=null", "validate_first=false"]), tmp_path / "hydra")
    UnifiedCLI(args=["fit", "--config", str(EXAMPLE), f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'cli'}", "--trainer.enable_checkpointing=false",
                     *(f"--data.init_args.{k}={v}" for k, v in small.items())])
    hydra = losses(read_metrics(tmp_path / "hydra" / "metrics.csv"))
    cli = losses(read_metrics(next((tmp_path / "cli").rglob("metrics.csv"))))
    assert sorted(cli) == sorted(hydra) and len(cli) == STEPS, (cli, hydra)
    for step, loss in hydra.items():
        assert cli[step] == pytest.approx(loss, abs=1e-6), f"step {step}: {cli[step]} against {loss}"


def test_the_policy_section_takes_what_build_policy_takes() -> None:
    """``policy:`` is build_policy's arguments (but the tokenizer, the datamodule's)."""
    taken = [name for name in inspect.signature(build_policy).parameters if name != "tokenizer"]
    assert [f.name for f in dataclasses.fields(Policy)] == taken


def test_a_dense_signal_is_configured_by_the_keys_users_type(tmp_path: Path) -> None:
    """``Dense`` keeps the teacher its keys resolve to in its fields, so jsonargparse, which
    types a dataclass's arguments by its fields, refused ``teacher: DIR`` before
    :func:`lightning_unified.cli.concrete_init_hints`."""
    from lightning_unified.specs import HFTeacher
    from lightning_unified.tasks.addition import checkpoint_path

    import yaml

    dense = tmp_path / "dense.yaml"
    dense.write_text(yaml.safe_dump({"model": {
        "data_source": {"class_path": "lightning_unified.specs.OnPolicy", "init_args": {"sampling": {"num_generations": 2}}},
        "signal": {"class_path": "lightning_unified.specs.Dense",
                   "init_args": {"teacher": checkpoint_path("teacher"), "divergence": "reverse_kl", "engine": "hf"}}}}))
    cli = UnifiedCLI(run=False, args=["--config", str(EXAMPLE), "--config", str(dense),
                                      f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.num_train=16"])
    assert isinstance(cli.model.signal.teacher, HFTeacher) and cli.model.signal.divergence == "reverse_kl"
    assert cli.model.pipeline.names[:2] == ["sample", "teacher"]


def test_a_schedule_that_is_not_stepped_every_step_is_refused_by_name() -> None:
    """``TransformersSchedule`` wraps transformers' per-step schedules; one stepped by a metric
    (before: an AttributeError on ``lr_lambdas``) is named with the ones it takes."""
    import torch

    from lightning_unified.schedule import TransformersSchedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"name='reduce_lr_on_plateau' is not a per-step schedule.*cosine"):
        TransformersSchedule(optimizer, "reduce_lr_on_plateau")
    assert TransformersSchedule(optimizer, "linear", 0, 4).lr_lambdas[0](2) == 0.5
