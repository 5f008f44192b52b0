"""Bad input through the command line: Hydra's own errors reach the user unchanged, a named
error (a config key, a data file's line) prints as its one message with no traceback (the
traceback with HYDRA_FULL_ERROR=1), and a run that stops on bad data leaves no output that
looks complete."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lightning_helpers import save_chat_model
from tests.test_runs import ROOT


def run(*overrides: str, script: str = "train.py", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_a_wrong_value_is_one_line_naming_its_key(tmp_path: Path) -> None:
    """``seed=abc``: before, the message came last after a traceback of ten frames."""
    done = run("seed=abc", f"hydra.run.dir={tmp_path}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert lines[0] == "ConfigError: seed must be a whole number from 0 to 4294967295, got 'abc'", lines
    assert len(lines) == 2 and "HYDRA_FULL_ERROR=1" in lines[1], lines
    full = run("seed=abc", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "seed must be a whole number" in full.stderr


def test_evaluate_names_a_bad_file_in_one_line(tmp_path: Path) -> None:
    model = save_chat_model(tmp_path / "model")
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "What is 1+1?"}\n')
    done = run(str(data), model, "--max-new-tokens", "4", script="evaluate.py")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert any(line.startswith(f"DataError: {data}: ['exact_match'] compare each answer with a reference")
               for line in done.stderr.splitlines()), done.stderr


def test_an_error_hydra_wraps_is_reported_as_itself() -> None:
    """An error a spec raises while Hydra builds it reaches the user as the spec's message."""
    from hydra.utils import instantiate

    from lightning_unified.errors import named_error
    from tests.lightning_helpers import compose_config

    with pytest.raises(Exception) as caught:
        instantiate(compose_config(["data_source=on_policy", "data_source.probability=2"]).data_source)
    named = named_error(caught.value)
    assert isinstance(named, ValueError) and str(named) == "data_source.probability must be in [0, 1], got 2"
    assert named_error(RuntimeError("a bug")) is None


def test_a_plain_error_of_a_bug_in_the_package_keeps_its_traceback() -> None:
    """A TypeError or ValueError that Python raises on a package line that is no ``raise``
    (a bug: None where a number belongs, a bad unpacking) is not a check's message: it keeps
    its traceback, as any bug does; a check's own ``raise`` is still one message."""
    from lightning_unified.errors import named_error
    from lightning_unified.metrics import derived
    from lightning_unified.specs import Validation

    with pytest.raises(TypeError) as bug:
        derived({"grad_square": None}, 1.0, 1.0)  # Python's own TypeError, on a line of metrics.py
    assert named_error(bug.value) is None
    with pytest.raises(ValueError) as check:
        Validation(num_samples=0)
    assert named_error(check.value) is check.value


def test_every_error_class_of_the_package_is_reported_by_name() -> None:
    """Each exception class the package defines is a named error or declared internal."""
    from lightning_unified.errors import INTERNAL_ERRORS, NAMED_ERRORS

    package = ROOT / "lightning_unified"
    defined = set()
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception", "Mismatch", "Rows"))
                    for b in node.bases):
                defined.add((module, node.name))
    assert defined == set(NAMED_ERRORS) | set(INTERNAL_ERRORS)


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
    assert f"DataError: {data}, line 2: column 'response' is empty" in done.stderr.splitlines(), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (out / "metrics.csv").exists() and not (out / "policy").exists() and not (out / "checkpoints").exists()
