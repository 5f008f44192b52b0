"""Two CPU processes (gloo), each with its share of the batch: summing their gradients gives
the single-process gradient, because every normaliser uses the counts summed over ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import AGGREGATIONS, all_reduce_counts, loss_counts, token_scale
from lightning_unified.losses.objective import chunked_weighted_nll
from tests.conftest import make_problem

ROWS = {0: slice(0, 3), 1: slice(3, 8)}  # uneven shares: 3 and 5 sequences


def _loss(p, rows, mode, counts):
    scale = token_scale(p.mask[rows], mode, global_counts=counts, constant=40.0)
    return chunked_weighted_nll(
        p.hidden[rows], p.head, p.targets[rows], scale, weight_builders.advantage_indicator,
        fields={"advantages": p.advantages[rows]}, chunk_size=4,
    ).loss


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        p = make_problem(seed=30, batch=8)
        for mode in AGGREGATIONS:
            counts = all_reduce_counts(loss_counts(p.mask[ROWS[rank]]))
            assert counts == loss_counts(p.mask)  # every rank sees the global counts
            grads = torch.autograd.grad(_loss(p, ROWS[rank], mode, counts), p.leaves())
            for g in grads:
                dist.all_reduce(g)  # SUM, as a strategy would (DDP's mean is this over world size)
            if rank == 0:
                torch.save([g.clone() for g in grads], os.path.join(out_dir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_gradient(tmp_path) -> None:
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    p = make_problem(seed=30, batch=8)
    for mode in AGGREGATIONS:
        want = torch.autograd.grad(_loss(p, slice(None), mode, loss_counts(p.mask)), p.leaves())
        got = torch.load(tmp_path / f"{mode}.pt")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_counts_pass_through_without_a_process_group() -> None:
    counts = loss_counts(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert all_reduce_counts(counts) == counts
