"""An exception on one rank (a bug in a stage of the user's, say) stops every rank with that
error within a minute, instead of hanging in a collective: two real CPU processes. (A reward
function that raises is not a crash: its rows fail and the run goes on, tests/test_failed_rows.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lightning_unified.stages import Stage
from tests.lightning_helpers import FAST_TASK
from tests.test_runs import ROOT


class FailsOnRankOne(Stage):
    """A stage of the user's that works on rank 0 and raises on rank 1 at its second batch."""

    name = "fails_on_rank_one"
    calls = 0

    def run(self, trainer, host, batch, batch_idx) -> None:
        FailsOnRankOne.calls += 1
        if dist.is_initialized() and dist.get_rank() == 1 and FailsOnRankOne.calls >= 2:
            raise RuntimeError("the reward service is down")


def test_one_failing_rank_stops_both(tmp_path: Path) -> None:
    stage = "module.stages=[{_target_:tests.test_rank_failure.FailsOnRankOne}]"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=rl", "trainer=ddp", "trainer.max_steps=20",
           "data_source.sampling.num_generations=2", stage, "trainer.val_check_interval=20", *FAST_TASK,
           f"hydra.run.dir={tmp_path}"]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=240)
    elapsed = time.time() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "RuntimeError: the reward service is down" in output
    # rank 0 stops either through the watcher or because gloo saw rank 1's connection close;
    # the test below pins the watcher itself, where nothing else would stop the other rank
    assert "stopping because another rank failed: rank 1" in output or "Connection closed by peer" in output
    assert elapsed < 120, f"took {elapsed:.0f} s"


def _hung_peer(rank: int, port: int, out: str) -> None:
    """Rank 1 fails but stays alive (as an NCCL rank can); rank 0 waits in a collective."""
    from types import SimpleNamespace

    from lightning_unified.callbacks.rank_failure import RankFailureWatch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer = SimpleNamespace(world_size=2, global_rank=rank)
    watch = RankFailureWatch(poll_seconds=0.2)
    watch.setup(trainer, None, "fit")
    if rank == 1:
        watch.on_exception(trainer, None, RuntimeError("the reward service is down"))
        time.sleep(60)  # alive, never reaching the collective
    else:
        dist.barrier()  # would wait for the group's timeout (30 minutes) without the watcher
    Path(out, f"rank{rank}-returned").touch()


def test_the_watcher_stops_a_rank_waiting_for_a_failed_peer(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_rank_failure import _hung_peer; "
            f"_hung_peer(int(sys.argv[1]), {port}, {str(tmp_path)!r})")
    start = time.time()
    peers = [subprocess.Popen([sys.executable, "-c", code, str(rank)], stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        _, err0 = peers[0].communicate(timeout=60)
    finally:
        peers[1].kill()
        peers[1].wait()
    assert peers[0].returncode == 1 and time.time() - start < 60
    assert "[rank 0] stopping because another rank failed: rank 1: RuntimeError: the reward service is down" in err0
    assert not (tmp_path / "rank0-returned").exists()
