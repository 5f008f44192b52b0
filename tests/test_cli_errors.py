"""Bad input through the command line: Hydra's own errors reach the user unchanged, and a
run that stops on bad data leaves no output that looks complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.lightning_helpers import save_chat_model
from tests.test_runs import ROOT


def run(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
    ("data_source=sometimes", "Could not find 'data_source/sometimes'"),
])
def test_hydra_errors_reach_the_user(override: str, message: str, tmp_path: Path) -> None:
    done = run(override, f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


def test_bad_data_leaves_no_output_that_looks_complete(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "What is 1+1?", "response": "2"}\n{"prompt": "What is 2+2?", "response": ""}\n')
    out = tmp_path / "run"
    done = run("experiment=sft", f"model.path={model}", "task=files", f"task.train={data}", f"hydra.run.dir={out}")
    assert done.returncode != 0
    assert f"{data}, line 2: column 'response' is empty" in done.stderr
    assert not (out / "metrics.csv").exists() and not (out / "policy").exists() and not (out / "checkpoints").exists()
