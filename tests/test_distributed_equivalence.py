"""Every quadrant, and GKD, gives the same update on two processes (DDP, and FSDP2 through
ModelParallelStrategy) as on one process with the same global batch.

The data are read in order (task.shuffle=false), so one process's batch of 8 is exactly
the two ranks' batches of 4 (the distributed sampler deals rows out alternately). On-policy
sampling keeps only the most likely token (top_k=1): the same responses whatever each
rank's random stream, so the three layouts train on identical data. SGD without clipping
makes the update proportional to the gradient, so any error in the cross-rank normaliser
or reduction shows in the weights. The one-process run is made in the test's own process
(no second start of Python, Lightning and transformers); the two-process ones start their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_runs import read_metrics, train_in_its_layout

LAYOUTS = {"one_process": ("cpu", 8), "ddp": ("ddp", 4), "fsdp2": ("fsdp2_cpu", 4)}
GREEDY = ["data_source.sampling.top_k=1", "data_source.sampling.max_new_tokens=4"]
METHODS = {
    # tied input and output embeddings (SmolLM2): one parameter, one FSDP2 shard unit; the
    # other methods have separate ones. The run's first forward is a training step (as after
    # a resume): FSDP2's root must still be the whole policy, not the decoder the loss calls
    "sft_tied_embeddings_training_first": ["experiment=sft", "model.config.tie_word_embeddings=true",
                                           "validate_first=false"],
    "distill": ["experiment=distill"],
    # reinforce: GRPO's group baseline is zero when the group's samples are identical
    "rl": ["experiment=rl", "signal.advantage=reinforce", "data_source.sampling.num_generations=2", *GREEDY],
    # on-policy and dense; on-policy distillation differs from it only in its weights (its
    # preset is compared packed below)
    "gkd": ["experiment=gkd", *GREEDY],
    # FSDP2-specific parts, so compared under FSDP2 only: DPO's reference is a copy of the
    # starting policy taken before sharding; the self-teacher reads the sharded head whole
    "dpo": ["experiment=dpo"],
    "self_distill": ["experiment=self_distill", *GREEDY],
    # padding-free forwards: each rank packs its own share of the batch, the normaliser is the same
    "sft_packed": ["experiment=sft", "module.packing=true", "module.max_tokens_per_row=24"],
    "on_policy_distill_packed": ["experiment=on_policy_distill", "module.packing=true",
                                 "module.max_tokens_per_row=24", *GREEDY],
    # sampled one batch ahead (max_lag=1): each rank's own producer, the same lag on every
    # rank, the second batch sampled from the first step's weights and corrected by the ratio
    "rl_lag1": ["experiment=rl", "signal.advantage=reinforce", "data_source.sampling.num_generations=2", *GREEDY,
                "data_source.sampling.max_lag=1"],
    # the mixed source's seed 1 keeps the first batch's responses and samples the second: it
    # is handed to the producer during the first, off-policy, step
    "gkd_lag1": ["experiment=gkd", *GREEDY, "data_source.sampling.max_lag=1", "data_source.seed=1"],
    "on_policy_distill_lag1": ["experiment=on_policy_distill", *GREEDY, "data_source.sampling.max_lag=1"],
    # multi-turn episodes against the tool task's environment: the policy calls the tool, reads
    # it and answers; every rank runs the same number of turns (FSDP2's forwards need it)
    "rl_environment": ["task=multiply", "data_source=on_policy", "signal=sparse", "signal.advantage=reinforce",
                       "data_source.sampling.num_generations=2", "data_source.sampling.top_k=1"],
    # the same, sampled a batch ahead: each rank's producer runs whole episodes from its own copy
    # of the weights, with no collective in its thread beside the training step's
    "rl_environment_lag1": ["task=multiply", "data_source=on_policy", "signal=sparse", "signal.advantage=reinforce",
                            "data_source.sampling.num_generations=2", "data_source.sampling.top_k=1",
                            "data_source.sampling.max_lag=1"],
}
FSDP2_ONLY = {"dpo", "self_distill"}
# two steps of SGD without clipping on rows read in order; no samples written
SHARED = ["task.shuffle=false", "task.num_train=64", "task.num_val=16", "task.val_batch_size=16", "trainer.max_steps=2",
          "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "optimizer=sgd", "trainer.gradient_clip_val=null",
          "scheduler=constant", "module.samples_every_n_steps=null"]


# the step's diagnostics reduced over ranks (lightning_unified/metrics.py): two processes log
# what one process logs for the same global batch (a DDP gradient counted once, FSDP2's shards
# each; token means over every rank's tokens; the longest and shortest over every rank)
REDUCED = ("train/grad_norm", "train/entropy", "sampling/response_length", "sampling/clipped_fraction",
           "sampling/eos_fraction", "data/response_length", "reward/exact_match", "reward/digit_match")


def reduced_metrics(path: Path) -> dict[str, list[float]]:
    rows = read_metrics(path)
    names = {name for row in rows for name in row if name.startswith(REDUCED)}
    return {name: [float(r[name]) for r in rows if r.get(name)] for name in sorted(names)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_give_the_single_process_update(method: str, tmp_path: Path) -> None:
    policies, metrics = {}, {}
    layouts = {k: v for k, v in LAYOUTS.items() if method not in FSDP2_ONLY or k != "ddp"}
    for layout, (trainer, batch_size) in layouts.items():
        out = tmp_path / layout
        train_in_its_layout([*METHODS[method], f"trainer={trainer}", f"task.batch_size={batch_size}", *SHARED], out)
        policies[layout] = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
        metrics[layout] = reduced_metrics(out / "metrics.csv")
        if "data_source.sampling.max_lag=1" in METHODS[method]:
            # the sampled batches' lags (a mixed source's off-policy batches log none)
            lags = [float(r["sampling/lag"]) for r in read_metrics(out / "metrics.csv")
                    if r.get("sampling/lag") and r.get("sampling/on_policy", "1.0") == "1.0"]
            assert lags == ([1.0] if method == "gkd_lag1" else [0.0, 1.0]), f"{method} {layout}: {lags}"
    start = AutoModelForCausalLM.from_pretrained(_start(method)).state_dict() if _start(method) else None
    reference = policies["one_process"]
    if start is not None:
        assert any(not torch.equal(reference[k], start[k]) for k in reference), "the run must move the policy"
    assert {"train/grad_norm", "train/entropy"} <= set(metrics["one_process"]), sorted(metrics["one_process"])
    for layout in set(layouts) - {"one_process"}:
        assert set(metrics[layout]) == set(metrics["one_process"]), f"{method} {layout}: {sorted(metrics[layout])}"
        for name, values in metrics["one_process"].items():
            assert metrics[layout][name] == pytest.approx(values, rel=1e-4, abs=1e-6), f"{method} {layout} {name}"
        for key in reference:
            torch.testing.assert_close(policies[layout][key], reference[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key, layout=layout: f"{method} {layout} {key}: {m}")


def _start(method: str) -> str | None:
    from lightning_unified.tasks.addition import checkpoint_path

    if method.startswith("rl_environment"):
        return checkpoint_path("multiply_start")
    return checkpoint_path("rl_start") if method in ("rl", "dpo", "self_distill") else None


def test_ranks_that_sample_different_lengths_do_not_hang(tmp_path: Path) -> None:
    """One prompt per rank, sampled from an untrained model: each rank's response ends at
    its own EOS, so the ranks generate different numbers of tokens; generation keeps them in
    step (synced_gpus) and the run finishes."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_runs import ROOT

    widths = tmp_path / "widths"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=on_policy_distill", "trainer=ddp",
           "task.batch_size=1", "task.num_train=32", "task.num_val=8", "task.val_batch_size=8", "trainer.max_steps=6",
           "trainer.val_check_interval=6", "data_source.sampling.max_new_tokens=12", "save_policy=null",
           f"+callbacks=[{{_target_: tests.rank_widths.RecordWidths, path: '{widths}'}}]", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [[json.loads(line)["width"] for line in open(f"{widths}.rank{r}")] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert any(a != b for a, b in zip(*ranks)), f"the ranks never sampled different lengths: {ranks}"
