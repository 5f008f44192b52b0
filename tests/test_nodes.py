"""Two machines, played by two processes on the loopback address: each runs the same command
with its node rank, as a multi-node launch does, and they train as one run of 2 ranks. SFT
goes through torchrun's launch, RL with the vLLM engine through Lightning's own
(NODE_RANK, MASTER_ADDR, MASTER_PORT), each as docs/guides/distributed.md shows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_vllm
from tests.test_runs import ROOT, read_metrics

SMALL = ["task.num_train=64", "task.num_val=16", "task.batch_size=4", "task.val_batch_size=16", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "save_policy=null"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(commands: list[list[str]], env: list[dict], timeout: int = 400) -> list[str]:
    """Start every node's command at once; each must end cleanly. Returns their outputs."""
    nodes = [subprocess.Popen(c, cwd=ROOT, env={**os.environ, **e}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, e in zip(commands, env)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{out[-5000:]}"
    return outputs


def test_sft_on_two_nodes_launched_by_torchrun(tmp_path: Path) -> None:
    port = free_port()
    script = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--master-addr=127.0.0.1", f"--master-port={port}"]
    run = [str(ROOT / "scripts" / "train.py"), "experiment=sft", "trainer=ddp", "trainer.devices=1",
           "trainer.num_nodes=2", *SMALL, f"hydra.run.dir={tmp_path}"]
    outputs = run_nodes([[*script, f"--node-rank={rank}", *run] for rank in (0, 1)], [{}, {}])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1], outputs[1][-3000:]
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1"]
    assert any(r.get("val/exact_match") for r in rows)


def test_rl_with_the_vllm_engine_on_two_nodes(tmp_path: Path) -> None:
    require_vllm()
    port = free_port()
    run = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=rl", "trainer=ddp", "trainer.devices=1",
           "trainer.num_nodes=2", "data_source.sampling.engine=vllm", "data_source.sampling.vllm.kv_cache_gib=0.25",
           "data_source.sampling.num_generations=2", *SMALL, f"hydra.run.dir={tmp_path}"]
    env = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)} for rank in (0, 1)]
    outputs = run_nodes([run, run], env)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1], outputs[1][-3000:]
    rows = read_metrics(tmp_path / "metrics.csv")
    synced = [r for r in rows if r.get("sampling/sync_seconds")]
    assert len(synced) == 2, "each node's engine starts before step 0 and syncs after its update"
    kl = [float(r["importance/mismatch_kl"]) for r in rows if r.get("importance/mismatch_kl")]
    assert len(kl) == 2 and all(0.0 <= k < 1e-3 for k in kl), kl
