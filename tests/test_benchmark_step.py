"""scripts/benchmark_step.py runs end to end: a tiny shape, one step, both interleaved modes.
What it prints are timings, which no test judges (speed is measured by running the script);
this checks that each mode runs the loops it names and writes its rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_interleaved_benchmark_and_its_control_write_their_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), "--methods", "sft", "--vocab", "64", "--hidden",
         "32", "--batch", "2", "--prompt", "4", "--response", "4", "--repeats", "1", "--steps", "1", "--warmup", "1",
         "--interleave", "--control", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["control"], r["interleaved"]) for r in rows] == [("sft", False, True), ("sft", True, True)]
    for row in rows:
        assert row["plain_s"] > 0 and row["project_s"] > 0 and row["memory_ratio"] is None
    assert "sft (A/A)" in done.stdout
