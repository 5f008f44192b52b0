"""The GPU presets carry GPU settings: trainer=gpu and fsdp2_gpu compute in bf16 on float32
master weights, FSDP2 shards over every rank and writes distributed checkpoints, and
experiment=gpu_grpo samples through vLLM with CUDA graphs and sleep level 2. The same
preset runs end to end here, on a CPU, with only what needs a GPU swapped out."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate

from lightning_unified.config import train
from tests.lightning_helpers import compose_config, save_chat_model
from tests.test_runs import read_metrics
from tests.test_smollm2 import write_questions

GIVEN = ["experiment=gpu_grpo", "model.path=/models/qwen", "task.train=train.jsonl"]


def test_the_fsdp2_gpu_preset_shards_over_every_rank_and_writes_shards() -> None:
    for extra, ranks in (([], 1), (["trainer.devices=8"], 8), (["trainer.devices=4", "trainer.num_nodes=2"], 8)):
        cfg = compose_config(["trainer=fsdp2_gpu", *extra])
        strategy = instantiate(cfg.trainer.strategy)
        # Lightning's own "auto" is the number of machines, which fails the mesh on 8 GPUs
        assert strategy._data_parallel_size == ranks and strategy._tensor_parallel_size == 1
        assert strategy._save_distributed_checkpoint is True
        assert cfg.trainer.precision == "bf16-mixed"


def test_the_gpu_grpo_preset_has_the_settings_a_verl_user_picks() -> None:
    cfg = compose_config(GIVEN)
    assert cfg.model.dtype is None and cfg.model.gradient_checkpointing  # float32 master weights
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.strategy._target_.endswith("ModelParallelStrategy")
    assert cfg.trainer.strategy.save_distributed_checkpoint is True
    sampling = cfg.data_source.sampling
    assert sampling.engine == "vllm"
    assert sampling.vllm.enforce_eager is False and sampling.vllm.sleep is True and sampling.vllm.sleep_level == 2
    assert 0.5 <= sampling.vllm.gpu_memory_utilization <= 0.6
    assert cfg.module.chunk_size is None, "the device's own chunk: thousands of tokens on a GPU"
    assert compose_config([*GIVEN, "trainer=gpu"]).trainer.get("strategy") is None, "one GPU: trainer=gpu wins"


def test_the_gpu_grpo_preset_runs_on_a_cpu_with_only_the_gpu_parts_swapped(tmp_path: Path) -> None:
    """Its recipe (vLLM sampling, minibatches, the decoupled PPO ratio, packing, gradient
    checkpointing, float32 master weights) trains; the trainer, CUDA graphs and sleep mode,
    which need a GPU, are the CPU's."""
    model = save_chat_model(tmp_path / "model", num_attention_heads=2, num_key_value_heads=2)
    write_questions(tmp_path)
    cfg = compose_config(["experiment=gpu_grpo", f"model.path={model}", f"task.train={tmp_path / 'train.jsonl'}",
                          f"task.val={tmp_path / 'val.jsonl'}", "trainer=cpu", "data_source.sampling.vllm.sleep=false",
                          "data_source.sampling.vllm.enforce_eager=true", "data_source.sampling.vllm.kv_cache_gib=0.25",
                          "task.batch_size=4", "task.max_response_tokens=8", "task.max_prompt_tokens=64",
                          "trainer.max_steps=1", "trainer.val_check_interval=1", "save_policy=null"])
    metrics = train(cfg, tmp_path / "run")
    assert 0.0 <= metrics["val/numeric_answer"] <= 1.0
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    # 4 minibatches of one prompt's 8 replies: four optimizer steps on the one rollout
    assert any(r.get("train/optimizer_steps") == "4.0" for r in rows), [r for r in rows if r.get("train/loss")]
    # the engine's mismatch and staleness, on the sampler's side of the decoupled ratio
    assert any(r.get("importance/behaviour_kl") for r in rows), sorted(k for r in rows for k in r if r[k])
