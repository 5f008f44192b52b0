"""Every quadrant, and GKD, gives the same update on two processes (DDP, and FSDP2 through
ModelParallelStrategy) as on one process with the same global batch.

The data are read in order (task.shuffle=false), so one process's batch of 8 is exactly
the two ranks' batches of 4 (the distributed sampler deals rows out alternately). On-policy
sampling keeps only the most likely token (top_k=1): the same responses whatever each
rank's random stream, so the three layouts train on identical data. SGD without clipping
makes the update proportional to the gradient, so any error in the cross-rank normaliser
or reduction shows in the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_runs import run_script

LAYOUTS = {"one_process": ("cpu", 8), "ddp": ("ddp", 4), "fsdp2": ("fsdp2_cpu", 4)}
GREEDY = ["data_source.sampling.top_k=1", "data_source.sampling.max_new_tokens=4"]
METHODS = {
    "sft": ["experiment=sft"],
    "distill": ["experiment=distill"],
    # reinforce: GRPO's group baseline is zero when the group's samples are identical
    "rl": ["experiment=rl", "signal.advantage=reinforce", "data_source.sampling.num_generations=2", *GREEDY],
    "on_policy_distill": ["experiment=on_policy_distill", *GREEDY],
    "gkd": ["experiment=gkd", *GREEDY],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_give_the_single_process_update(method: str, tmp_path: Path) -> None:
    policies = {}
    for layout, (trainer, batch_size) in LAYOUTS.items():
        out = tmp_path / layout
        run_script(*METHODS[method], f"trainer={trainer}", f"task.batch_size={batch_size}", "task.shuffle=false",
                   "task.num_train=64", "task.num_val=16", "task.val_batch_size=16", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "optimizer=sgd", "trainer.gradient_clip_val=null",
                   "scheduler=constant", "module.samples_every_n_steps=null", f"hydra.run.dir={out}")
        policies[layout] = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    start = AutoModelForCausalLM.from_pretrained(_start(method)).state_dict() if _start(method) else None
    reference = policies["one_process"]
    if start is not None:
        assert any(not torch.equal(reference[k], start[k]) for k in reference), "the run must move the policy"
    for layout in ("ddp", "fsdp2"):
        for key in reference:
            torch.testing.assert_close(policies[layout][key], reference[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key, layout=layout: f"{method} {layout} {key}: {m}")


def _start(method: str) -> str | None:
    from lightning_unified.tasks.addition import checkpoint_path

    return checkpoint_path("rl_start") if method == "rl" else None
