"""Every rank's batches sampled ahead, in the one checkpoint.

Under DDP and FSDP2 each rank samples its own batches ahead of the trainer (its share of
the data, its own seeds), but one process writes the checkpoint's dict (rank 0; FSDP2's
distributed checkpoint too keeps everything but the weights in rank 0's metadata file).
Saving a rank's own state alone would resume every rank with rank 0's batches for
``max_lag`` steps and drop the others' without a word. So each rank's state is gathered
when the checkpoint is made, every rank calling Lightning's ``on_save_checkpoint`` (its
``dump_checkpoint`` runs on every rank, which ``Trainer.save_checkpoint`` requires), and on
load each rank takes its own entry::

    {"world_size": 2, "per_rank": [{"rank": 0, "max_lag": 2, "ahead": ..., "kept": ...},
                                   {"rank": 1, ...}]}

A rank's batches cannot be trained by another (its loader's place is after them), so a
checkpoint that keeps batches ahead resumes only on as many processes as wrote it.
Checkpoints written before (one rank's state, ``{"max_lag", "ahead", "kept"}``) still load
on one process.
"""

from __future__ import annotations

import torch.distributed as dist


def saved_rollouts(checkpoint: dict) -> dict:
    """What a checkpoint keeps of the rollouts: ``checkpoint["rollouts"]``, or, written before
    the rollout owner kept them, under the sample stage's name."""
    return checkpoint.get("rollouts") or checkpoint.get("stages", {}).get("sample", {})


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_ranks(state: dict) -> dict:
    """Every rank's ``state`` (this rank's, stamped with its rank), on every rank: a
    collective, so every rank calls it at the same point (a checkpoint)."""
    rank, world_size = rank_and_world_size()
    state = {**state, "rank": rank}
    per_rank = [state]
    if world_size > 1:
        # pickled through the process group (on the CPU under gloo; the states' tensors are on the CPU)
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, state)
    return {"world_size": world_size, "per_rank": per_rank}


def this_ranks(saved: dict, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s own state (of ``world_size`` processes) from what :func:`gather_ranks`
    saved, or from a checkpoint written before it (one rank's state). Raises when the
    checkpoint keeps batches ahead for another number of processes than this run's, or when
    the entry is another rank's."""
    if not saved:
        return {}
    if "per_rank" not in saved:
        if saved.get("ahead") and world_size > 1:
            raise ValueError(
                f"the checkpoint keeps batches sampled ahead (data_source.sampling.max_lag={saved.get('max_lag')}) in "
                f"the format written before each rank's were saved: one process's batches only (rank 0's), and this "
                f"run has {world_size} processes, whose other ranks' batches are not in it. Resume it on one process "
                f"if one process wrote it; a checkpoint written by several processes at a lag in that format cannot "
                f"be resumed exactly (resume from one written at data_source.sampling.max_lag=0, or by this version)")
        return saved
    saved_size, per_rank = saved["world_size"], saved["per_rank"]
    if len(per_rank) != saved_size:
        raise ValueError(f"the checkpoint's rollouts hold {len(per_rank)} ranks' states for world_size={saved_size}: "
                         f"it was not written by this package, or was edited")
    if saved_size != world_size:
        if any(entry.get("ahead") for entry in per_rank):
            lag = next(entry["max_lag"] for entry in per_rank if entry.get("ahead"))
            raise ValueError(
                f"the checkpoint keeps the batches each of its {saved_size} processes sampled ahead "
                f"(data_source.sampling.max_lag={lag}), and this run has {world_size}: a rank's batches cannot be "
                f"trained by another, so resume it with {saved_size} processes (trainer.devices x trainer.num_nodes); "
                f"a checkpoint written at data_source.sampling.max_lag=0 keeps none and resumes on any number")
        return {}  # nothing sampled ahead on any rank: nothing to hand back
    entry = per_rank[rank]
    if entry.get("rank") != rank:
        raise ValueError(f"the checkpoint's rollouts for rank {rank} are rank {entry.get('rank')}'s: every rank would "
                         f"train on another's batches sampled ahead; it was not written by this package, or was edited")
    return entry
