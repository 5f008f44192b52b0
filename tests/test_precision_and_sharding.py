"""Work outside training_step runs under the trainer's precision, and validation under FSDP2
runs without inference mode (FSDP2's unshard in generate fails on inference tensors)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_unified.pipeline import build_batch_pipeline
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.stages.reference import ReferenceStage
from lightning_unified.specs import Dense, OnPolicy, Reference, Sampling
from tests.lightning_helpers import quiet_trainer, save_tiny_teacher, tiny_datamodule, tiny_module


class AutocastSpy:
    """A forward pre-hook noting whether CPU autocast was on when a model ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[bool] = []
        model.register_forward_pre_hook(lambda module, args: self.seen.append(torch.is_autocast_enabled("cpu")))


@pytest.mark.parametrize("precision,expected", [("bf16-mixed", True), ("32-true", False)])
def test_teacher_reference_and_sampling_run_under_the_trainer_precision(tmp_path, precision: str,
                                                                         expected: bool) -> None:
    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    spec = OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=3))
    module = tiny_module(spec, Dense(teacher=teacher_dir, divergence="reverse_kl"))
    module.reference = Reference(kl_coef=0.1)
    module.pipeline = build_batch_pipeline(module.data_source, module.signal, module.reference)
    teacher = next(s for s in module.pipeline if isinstance(s, TeacherStage))
    reference = next(s for s in module.pipeline if isinstance(s, ReferenceStage))
    spies = {}

    class Attach(L.Callback):
        def on_train_start(self, trainer, pl_module):
            spies["teacher"] = AutocastSpy(teacher.models["teacher"].model)
            spies["reference"] = AutocastSpy(reference.model.model)
            spies["policy"] = AutocastSpy(pl_module.policy.model)  # sampling and the step

    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, precision=precision, callbacks=[Attach()])
    trainer.fit(module, datamodule=tiny_datamodule(batch_size=2))
    for name, spy in spies.items():
        assert spy.seen and all(seen == expected for seen in spy.seen), (name, spy.seen)


FSDP2_VALIDATION = """
import json
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_unified.specs import OffPolicy, Sparse
from tests.lightning_helpers import tiny_datamodule, tiny_module

seen = {}


class Spy(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        seen["inference_mode"] = torch.is_inference_mode_enabled()
        seen["loop"] = trainer.validate_loop.inference_mode
        seen["fit_val_loop"] = trainer.fit_loop.epoch_loop.val_loop.inference_mode


module = tiny_module(OffPolicy(), Sparse())
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1,
                    tensor_parallel_size=1), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[Spy()])
trainer.validate(module, datamodule=tiny_datamodule())
seen["sharded"] = module.policy_is_sharded()
print("SEEN " + json.dumps(seen))
"""


def test_fsdp2_validates_without_inference_mode() -> None:
    """In its own process: the strategy starts a process group and sets MASTER_PORT, which
    later DDP runs of this test session would otherwise inherit."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FSDP2_VALIDATION], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("SEEN "))
    assert json.loads(line[5:]) == {"inference_mode": False, "loop": False, "fit_val_loop": False, "sharded": True}


FSDP2_MIXED_PRECISION = """
import json
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_unified.specs import OffPolicy, Sparse
from tests.lightning_helpers import tiny_datamodule, tiny_module

seen = {"layer_weight": set(), "head_hidden": set(), "head_token_scale": set()}


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Spy(L.Callback):
    def on_train_start(self, trainer, pl_module):
        layer = pl_module.policy.model.layers[0].mlp.down_proj
        layer.register_forward_pre_hook(lambda m, args: seen["layer_weight"].add(str(m.weight.dtype)))
        head = pl_module.policy.get_output_embeddings()

        def on_head(m, args, kwargs):
            if "loss_inputs" in kwargs:
                seen["head_hidden"].add(str(args[0].dtype))
                seen["head_token_scale"].add(str(kwargs["loss_inputs"]["token_scale"].dtype))
        head.register_forward_pre_hook(on_head, with_kwargs=True)
        seen["master_before"] = sorted({str(local(p).dtype) for p in pl_module.policy.parameters()})
        seen["start"] = local(pl_module.policy.model.layers[0].mlp.down_proj.weight).detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        seen["grads"] = sorted({str(local(p.grad).dtype) for p in pl_module.policy.parameters() if p.grad is not None})

    def on_train_end(self, trainer, pl_module):
        end = local(pl_module.policy.model.layers[0].mlp.down_proj.weight).detach()
        seen["moved"] = bool((end != seen.pop("start")).any())
        seen["master_after"] = sorted({str(local(p).dtype) for p in pl_module.policy.parameters()})


module = tiny_module(OffPolicy(), Sparse())
trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, limit_val_batches=0,
                    strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Spy()])
trainer.fit(module, datamodule=tiny_datamodule())
print("SEEN " + json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in seen.items()}))
"""


def test_fsdp2_under_bf16_mixed_gathers_bf16_and_keeps_float32_master_weights() -> None:
    """FSDP2's MixedPrecisionPolicy, as verl and torchtune set it: the float32 shards are
    gathered as bf16 for the forward, gradients come back (reduced) in float32 to float32
    master weights, and the loss's own inputs reach the output head uncast."""
    seen = _run_in_own_process(FSDP2_MIXED_PRECISION)
    assert seen["layer_weight"] == ["torch.bfloat16"], "the unsharded weights the layers compute with"
    assert seen["master_before"] == seen["master_after"] == ["torch.float32"]
    assert seen["grads"] == ["torch.float32"] and seen["moved"]
    assert seen["head_hidden"] == ["torch.bfloat16"]
    assert seen["head_token_scale"] == ["torch.float32"], "the loss's weights are not cast to bf16 on the way in"


def _run_in_own_process(script: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("SEEN "))
    return json.loads(line[5:])
