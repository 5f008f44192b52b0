"""``python -m lightning_unified.rules`` prints the rules' table (docs/rules.md holds it)."""

from lightning_unified.rules import table

print(table(), end="")
