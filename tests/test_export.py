"""A loadable model at every checkpoint, and any checkpoint converted into one: a run killed
after its first checkpoint leaves ``exports/step_2``, which ``from_pretrained`` loads with
the module's logits; ``scripts/export.py`` gives the same from the checkpoint itself, a
LoRA checkpoint as an adapter peft loads or merged. The killed run and the FSDP2 run are
the ones test_resume.py and test_distributed_checkpoint.py make anyway: they call
:func:`check_the_killed_runs_export` and ``check_exports_at_step_2``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from lightning_unified import batch as F
from lightning_unified.config import build_run, train
from tests.lightning_helpers import compose_config
from tests.test_runs import ROOT, read_metrics


def export_script(*args: str) -> None:
    """scripts/export.py as a user runs it, in this process (saving a start of Python)."""
    argv = sys.argv
    sys.argv = ["export.py", *map(str, args)]
    try:
        runpy.run_path(str(ROOT / "scripts" / "export.py"), run_name="__main__")
    finally:
        sys.argv = argv


def module_at(checkpoint: Path, common: list[str], tmp: Path):
    """The run's module as Lightning restores it from ``checkpoint`` (its state dict
    loaded; a LoRA checkpoint holds the adapters, the base comes from the config again)."""
    run = build_run(compose_config(common), tmp)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    missing, unexpected = run.module.load_state_dict(state, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing), (unexpected, missing[:3])
    run.module.policy.eval()
    return run


def prompts(run) -> dict:
    run.datamodule.setup("validate")
    batch = next(iter(run.datamodule.val_dataloader()))
    return {"input_ids": batch[F.PROMPT_IDS], "attention_mask": batch[F.PROMPT_MASK]}


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model.eval()(**inputs).logits


def card(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def check_the_killed_runs_export(run_dir: Path, common: list[str], tmp_path: Path) -> None:
    """A run of ``common`` (SFT, a checkpoint every 2 steps, which export_every follows),
    killed with SIGKILL after its step-2 checkpoint (test_resume.py's
    ``test_killed_and_resumed_equals_uninterrupted[sft]``, which makes that run anyway,
    calls this before resuming it): its ``exports/step_2`` loads with the logits of the
    module restored from the checkpoint, with a model card; scripts/export.py on the
    checkpoint gives the same, and names what it lacks or what does not fit."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_2"], "whole, and nothing half-written"

    run = module_at(checkpoint, common, tmp_path / "reference")
    inputs = prompts(run)
    want = logits(run.module.policy, inputs)
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "exports" / "step_2")
    torch.testing.assert_close(logits(exported, inputs), want, rtol=0, atol=1e-6)

    # the model card: Hub front matter, the method and preset, the validation figures, the config
    meta, body = card(run_dir / "exports" / "step_2")
    assert meta["library_name"] == "transformers" and {"off_policy", "sparse", "sft"} <= set(meta["tags"])
    assert "preset: `experiment=sft`" in body and "data_source=off_policy signal=sparse" in body
    first = next(r for r in read_metrics(run_dir / "metrics.csv") if r.get("val/exact_match"))
    assert f"| `val/exact_match` | {float(first['val/exact_match']):.4f} |" in body
    assert f"Measured at optimizer step {first['step']}." in body  # the latest before step 2's export
    config = OmegaConf.create(body.split("```yaml\n")[1].split("```")[0])
    assert config.model.config.hidden_size == run.module.policy.config.hidden_size
    assert config.trainer.max_steps == compose_config(common).trainer.max_steps

    # scripts/export.py on the one-process checkpoint
    out = tmp_path / "from_checkpoint"
    export_script(checkpoint, out)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), inputs), want, rtol=0, atol=1e-6)
    assert card(out)[1] == card(run_dir / "exports" / "step_2")[1], "the checkpoint keeps what the card states"

    # a checkpoint moved out of its run, without the config it keeps: --config is named
    moved = tmp_path / "moved.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    del state["model_card"]
    torch.save(state, moved)
    with pytest.raises(SystemExit, match=r"keeps no config .* give the run's config with --config"):
        export_script(moved, tmp_path / "refused")
    export_script(moved, tmp_path / "with_config", "--config", run_dir / ".hydra" / "config.yaml")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "with_config"), inputs), want,
                               rtol=0, atol=1e-6)
    # a config of another model is refused by name, not half-loaded
    other = tmp_path / "other.yaml"
    other.write_text((run_dir / ".hydra" / "config.yaml").read_text().replace("hidden_size: 128", "hidden_size: 64"))
    with pytest.raises(SystemExit, match=r"is \[.*\] there and \[.*\] in the policy of the run's config"):
        export_script(moved, tmp_path / "other", "--config", other)
    with pytest.raises(SystemExit, match=r"--merge: the run's policy has no LoRA adapters"):
        export_script(checkpoint, tmp_path / "merged", "--merge")


def test_a_lora_run_exports_its_adapter_for_peft_and_merged(tmp_path: Path) -> None:
    from peft import PeftModel

    common = ["experiment=sft", "model.lora.r=4", "trainer.max_steps=2", "checkpoint_every_n_steps=2",
              "save_merged=true", "save_policy=null", "validate_first=false", "trainer.val_check_interval=2",
              "task.num_train=64", "task.num_val=8", "task.batch_size=8", "task.val_batch_size=8"]
    train(compose_config(common), tmp_path / "run")
    exports = tmp_path / "run" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["step_2", "step_2_merged"]
    assert (exports / "step_2" / "adapter_config.json").is_file() and card(exports / "step_2")[0]["library_name"] == "peft"

    run = module_at(tmp_path / "run" / "checkpoints" / "last.ckpt", common, tmp_path / "reference")
    inputs = prompts(run)
    want = logits(run.module.policy, inputs)

    def base():  # the run's base model: a fresh one from model.config and the seed
        return build_run(compose_config([*common, "model.lora.r=0"]), tmp_path / "base").module.policy

    export_script(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "adapter")
    export_script(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "merged", "--merge")
    for adapter in (exports / "step_2", tmp_path / "adapter"):
        torch.testing.assert_close(logits(PeftModel.from_pretrained(base(), adapter), inputs), want, rtol=0, atol=1e-6)
    for merged in (exports / "step_2_merged", tmp_path / "merged"):
        assert not (merged / "adapter_config.json").exists()
        # merging adds B @ A into each weight once: float32 rounding, not another model
        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), inputs), want,
                                   rtol=1e-5, atol=1e-5)


def test_a_sharded_lora_policy_saves_its_merged_model(tmp_path: Path) -> None:
    """save_merged under FSDP2: the merged model comes from the gathered state (a sharded
    module cannot be deep-copied), with the unsharded policy's merged logits. One process
    in a gloo group of one: fully_shard's DTensors all the same."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_unified.models.checkpoint import save_policy
    from lightning_unified.models.loading import build_policy
    from lightning_unified.models.loss_head import install_loss_head
    from lightning_unified.models.lora import merged_copy
    from lightning_unified.models.sharding import is_sharded, shard_policy
    from tests.lightning_helpers import TINY, tiny_datamodule

    tokenizer = tiny_datamodule().tokenizer
    policy = build_policy(tokenizer, config=TINY, seed=0, lora={"r": 4})
    with torch.no_grad():  # adapters that change the model (peft starts B at zero)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}
    want = logits(merged_copy(policy), inputs)
    install_loss_head(policy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard_policy(policy, init_device_mesh("cpu", (1,)))
        assert is_sharded(policy)
        save_policy(policy, tokenizer, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), inputs), want,
                               rtol=0, atol=1e-6)


def test_exports_left_half_written_or_older_than_the_newest_kept_are_deleted(tmp_path: Path) -> None:
    from lightning_unified.callbacks.export import PolicyExport

    for name in ("step_2", "step_2_merged", "step_4", "step_4_merged", "step_6.partial", "step_10"):
        (tmp_path / name).mkdir()
    PolicyExport(tmp_path, every=2, keep=2)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_4_merged"]
    PolicyExport(tmp_path, every=2, keep=None)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_4_merged"]
    with pytest.raises(ValueError, match=r"export_keep must be a whole number >= 1 or null, got 0"):
        PolicyExport(tmp_path, every=2, keep=0)


def test_a_reward_models_exports_are_its_classifier_with_a_reward_model_card(tmp_path: Path) -> None:
    """signal=reward_model with LoRA and save_merged: the step export (and the final save,
    the same call) is one merged AutoModelForSequenceClassification with a card saying so
    (it crashed writing a card into the merged directory the reward model never writes), and
    scripts/export.py on its checkpoint writes the same classifier, with the trained head,
    not the causal LM's untrained output head."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from transformers import AutoModelForSequenceClassification

    from lightning_unified.callbacks.export import policy_export
    from lightning_unified.models.checkpoint import trainable_state

    pytest.importorskip("peft")
    run = build_run(compose_config(["experiment=reward_model", "task.pairs=true", "model.lora.r=4",
                                    "save_merged=true", "checkpoint_every_n_steps=2"]), tmp_path / "run")
    module, exports = run.module, policy_export(run.trainer)
    with torch.no_grad():
        module.objective.head.score.weight.normal_()  # a head of its own, not the initial one
    want = module.objective.head.score.weight.detach().clone()

    exports.write(SimpleNamespace(is_global_zero=True, global_step=2), module, tmp_path / "run" / "exports" / "step_2",
                  tmp_path / "run" / "exports" / "step_2_merged")
    assert sorted(p.name for p in (tmp_path / "run" / "exports").iterdir()) == ["step_2"]
    front, body = card(tmp_path / "run" / "exports" / "step_2")
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers", front
    assert "AutoModelForSequenceClassification.from_pretrained(DIR)" in body and "# Reward model at" in body
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "exports" / "step_2")
    torch.testing.assert_close(exported.score.weight, want)

    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": trainable_state(module.state_dict(), module.policy), "global_step": 2,
                "model_card": {"config": exports.config, "step": 2}}, checkpoint)
    export_script(checkpoint, tmp_path / "hf")
    assert OmegaConf.create(exports.config).signal._target_.endswith("RewardPairs")
    converted = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert converted.config.architectures == ["LlamaForSequenceClassification"]
    assert not (tmp_path / "hf" / "adapter_config.json").exists()
    torch.testing.assert_close(converted.score.weight, want)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits, exported(**inputs).logits)
    assert card(tmp_path / "hf")[0]["pipeline_tag"] == "text-classification"


def test_export_script_errors_are_one_line_unless_hydra_full_error(tmp_path: Path, monkeypatch) -> None:
    """A named problem is one line with the hint; HYDRA_FULL_ERROR=1 shows its traceback,
    as scripts/train.py does (the script caught every ValueError, a library's too, and
    printed it without a hint or a way to the traceback)."""
    missing = tmp_path / "none.ckpt"
    with pytest.raises(SystemExit, match=r"export: .*no such checkpoint.*\n\(HYDRA_FULL_ERROR=1 shows the traceback\)"):
        export_script(missing, tmp_path / "out")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_script(missing, tmp_path / "out")
