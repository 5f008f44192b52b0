"""scripts/gpu_checks.sh's CPU-safe parts: every check's code runs here at tiny sizes
(``--cpu-smoke``), without Hydra (a lent GPU machine has none), one line per check, and a
failing check is named while the next one still runs."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import require_vllm
from tests.test_runs import ROOT

# the checks with Hydra and OmegaConf unimportable, as on the lent machine
WITHOUT_HYDRA = ("import runpy, sys; sys.modules.update(hydra=None, omegaconf=None); "
                 "sys.argv = ['gpu_checks.py', *sys.argv[1:]]; "
                 "runpy.run_path('scripts/gpu_checks.py', run_name='__main__')")


def checks(*args: str, timeout: int = 300) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, "-c", WITHOUT_HYDRA, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, [line for line in done.stdout.splitlines() if line.startswith("CHECK ")], done.stderr


def test_the_cpu_safe_checks_run_without_hydra() -> None:
    code, lines, stderr = checks("--cpu-smoke", "--check", "fsdp2,packing,step")
    assert code == 0, stderr[-3000:]
    assert [line.split(" |")[0] for line in lines] == ["CHECK fsdp2 ok", "CHECK packing ok", "CHECK step ok"], lines
    assert "gathered=bf16 master_and_grads=fp32" in lines[0] and "shards=" in lines[0]
    assert "attention=sdpa loss_gap_rel=" in lines[1]
    assert "sft_time_x=" in lines[2] and "distill_time_x=" in lines[2]


def test_the_vllm_check_runs_on_the_cpu_build() -> None:
    """Two engine starts (lag 0, then sampled ahead at lag 1): about a minute on this CPU."""
    require_vllm()
    code, lines, stderr = checks("--cpu-smoke", "--check", "vllm")
    assert code == 0, stderr[-3000:]
    assert lines and lines[0].startswith("CHECK vllm ok") and "lag1_mismatch_kl=" in lines[0], lines


def test_a_failing_check_is_named_and_the_next_one_runs(tmp_path) -> None:
    done = subprocess.run(["bash", "scripts/gpu_checks.sh", "--cpu-smoke", "nonexistent,packing"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("CHECK ")]
    assert done.returncode == 1
    assert lines[0].startswith("CHECK nonexistent FAIL | error=exit 2") and lines[1].startswith("CHECK packing ok")
    assert (tmp_path / "checks.txt").read_text().splitlines() == lines
