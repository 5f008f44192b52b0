"""The README's Python examples (the loss on its own, and the drop-in Lightning example) run
as written, so the docs cannot drift from the code."""

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
    out = capsys.readouterr().out
    assert "KL(teacher || student) =" in out
    # the drop-in example trained and validated with a plain Lightning Trainer
    assert re.search(r"held-out exact match: [01]\.\d+", out), out[-2000:]
