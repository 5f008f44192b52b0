"""Every config composes and instantiates, and the quadrant specialisation follows the
data_source x signal choice."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_unified.config import CONFIG_DIR, build_run
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Sparse
from tests.lightning_helpers import FAST_TASK, compose_config

ALL_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# the SmolLM2 presets need scripts/prepare_smollm2.py's model and data: tests/test_smollm2.py
# runs them on a tiny chat model and generated data of the same shape instead; the GPU presets
# (your model and data, a GPU trainer) run in tests/test_gpu_presets.py with the CPU's parts
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if not e.startswith(("smollm2_", "gpu_"))]
CPU_TRAINERS = ["cpu", "ddp", "ddp_spawn", "fsdp2_cpu"]
GPU_TRAINERS = sorted({p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")} - set(CPU_TRAINERS))


def test_every_preset_the_issue_names_exists() -> None:
    assert {"sft", "distill", "rl", "on_policy_distill", "gkd", "dft"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment: str, tmp_path) -> None:
    run = build_run(compose_config([f"experiment={experiment}", *FAST_TASK]), tmp_path)
    assert run.module.policy.num_parameters() > 0
    assert run.trainer.max_steps > 0


@pytest.mark.parametrize("data_source", ["off_policy", "on_policy", "mixed"])
@pytest.mark.parametrize("signal", ["sparse", "dense"])
def test_quadrant_instantiates(data_source: str, signal: str, tmp_path) -> None:
    run = build_run(compose_config([f"data_source={data_source}", f"signal={signal}", *FAST_TASK]), tmp_path)
    assert isinstance(run.module.data_source, OffPolicy if data_source == "off_policy" else OnPolicy)
    assert isinstance(run.module.signal, Sparse if signal == "sparse" else Dense)
    if data_source == "mixed":
        assert run.module.data_source.probability == 0.5


def test_quadrant_specialisation_applies() -> None:
    rl = compose_config(["data_source=on_policy", "signal=sparse"])
    assert rl.model.path.endswith("rl_start"), "RL starts from the shipped, briefly trained policy"
    opd = compose_config(["data_source=on_policy", "signal=dense"])
    assert opd.signal.divergence == "reverse_kl" and opd.data_source.sampling.num_generations == 1
    sft = compose_config(["data_source=off_policy", "signal=sparse"])
    assert sft.model.path is None and sft.trainer.max_steps == 1200
    # a command-line override still wins over the quadrant's default
    assert compose_config(["experiment=rl", "trainer.max_steps=7"]).trainer.max_steps == 7


@pytest.mark.parametrize("trainer", CPU_TRAINERS)
def test_cpu_trainer_instantiates(trainer: str, tmp_path) -> None:
    run = build_run(compose_config([f"trainer={trainer}", *FAST_TASK]), tmp_path)
    assert run.trainer.num_devices == (1 if trainer == "cpu" else 2)


@pytest.mark.parametrize("trainer", GPU_TRAINERS)
def test_gpu_trainer_composes(trainer: str) -> None:
    cfg = compose_config([f"trainer={trainer}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    # the strategy object itself builds without a GPU; the Trainer would need one
    if isinstance(cfg.trainer.get("strategy"), DictConfig):
        assert instantiate(cfg.trainer.strategy) is not None


# --- the schedule's length is the run's --------------------------------------------------------
def test_one_epoch_without_max_steps_gets_a_schedule_as_long_as_the_epoch(tmp_path) -> None:
    """``trainer.max_steps=-1 trainer.max_epochs=1`` once gave the cosine schedule
    ``num_training_steps=-1``, and the learning rate alternated between its peak and 0."""
    import lightning as L

    cfg = compose_config(["experiment=sft", *FAST_TASK, "task.num_train=40", "trainer.max_steps=-1",
                          "trainer.max_epochs=1", "scheduler.num_warmup_steps=0", "save_policy=null"])
    run = build_run(cfg, tmp_path)
    rates = []

    class Rates(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            rates.append(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])

    run.trainer.callbacks.append(Rates())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert len(rates) == 5, "40 problems in batches of 8: one epoch is 5 steps"
    assert all(a > b for a, b in zip(rates, rates[1:])), f"the rate falls every step: {rates}"
    assert rates[-1] == pytest.approx(0.0, abs=1e-12), "and reaches 0 at the run's last step"


def test_a_run_without_end_or_with_a_wordy_count_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"trainer.max_steps must be a whole number, got 'abc'"):
        build_run(compose_config(["trainer.max_steps=abc"]), tmp_path)
    run = build_run(compose_config([*FAST_TASK, "trainer.max_steps=-1", "trainer.max_epochs=-1"]), tmp_path)
    with pytest.raises(ValueError, match="trains without end, so the learning-rate schedule has no length"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
