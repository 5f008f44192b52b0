#!/usr/bin/env bash
# Set-up for a fresh machine: torch first (the CPU wheel when none is installed: a plain
# `torch` requirement would pull a multi-GB CUDA build), then this package with its extras
# (LoRA, TensorBoard, GGUF loading, plots) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[lora,tensorboard,gguf,plots,dev]"
