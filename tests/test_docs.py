"""The documentation cannot drift from the code: the README's and the site's Python examples
run as written, every `python scripts/train.py` command on them composes, the README stays a
front page whose links resolve, and the site builds with warnings as errors."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lightning_helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def python_blocks() -> dict[str, Path]:
    """Each distinct ```python example, with the first file that shows it."""
    blocks: dict[str, Path] = {}
    for path in [README, *PAGES]:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
            blocks.setdefault(block, path)
    return blocks


def train_commands() -> list[tuple[Path, str]]:
    """Every `python scripts/train.py ...` command in an indented or fenced block, its
    backslash continuations joined and its trailing comment dropped."""
    commands = []
    for path in [README, *PAGES]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("python scripts/train.py"):
                commands.append((path, line))
    return commands


def test_every_python_example_runs(capsys) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2, "the README's drop-in example and the loss on its own"
    torch.manual_seed(0)
    for block, path in blocks.items():
        exec(compile(block, str(path), "exec"), {})
    out = capsys.readouterr().out
    assert "KL(teacher || student) =" in out
    # the drop-in example trained and validated with a plain Lightning Trainer
    assert re.search(r"held-out exact match: [01]\.\d+", out), out[-2000:]


def test_every_train_command_composes() -> None:
    """Each command's overrides compose into a config (a stale key or group fails here);
    a multirun's sweep is composed at its first value."""
    commands = train_commands()
    assert len(commands) >= 40, len(commands)
    for path, command in commands:
        words = shlex.split(command, comments=True)[2:]
        overrides = [w.split(",")[0] if "=" in w and "[" not in w and "{" not in w else w
                     for w in words if w not in ("-m", "--multirun") and not w.startswith("hydra.")]
        try:
            compose_config(overrides)
        except Exception as error:  # noqa: BLE001 - name the page and the command
            pytest.fail(f"{path.relative_to(ROOT)}: `{command}` does not compose: {error}")


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 15
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """`mkdocs build --strict`: every page of the nav exists, every link and anchor between
    pages resolves, and the API reference renders from the docstrings."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "chunked_weighted_nll" in api and "grpo_batch_std_advantages" in api
    on_disk = {p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in PAGES}
    built = {p.parent.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {page for page in on_disk if page != "index"} <= built, "a page is missing from the site"
