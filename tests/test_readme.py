"""The README's Python examples run as written, so the docs cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python example"
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert "KL(teacher || student) =" in capsys.readouterr().out
