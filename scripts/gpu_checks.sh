#!/usr/bin/env bash
# The GPU checks, one line each with its figure, in at most 8 minutes on one H100 (each check
# in its own process, under a time limit that keeps the sum inside 8 minutes):
#   bash scripts/gpu_checks.sh                # every check
#   bash scripts/gpu_checks.sh fsdp2,step     # some of them
#   bash scripts/gpu_checks.sh --cpu-smoke    # the CPU-safe code paths at tiny sizes (what CI runs)
# Needs torch, lightning, transformers, peft and torchmetrics; not hydra (the checks build
# their objects in Python). vLLM and flash-attn are used where installed, and their checks
# print "skip" otherwise. A failed check prints FAIL with its error and the next one runs; the
# script exits 1 if any failed. Lines and logs land in $OUT (default gpu_out/).
set -u
CHECKS=vllm,fsdp2,packing,step
SMOKE=
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=--cpu-smoke ;;
    -*) echo "usage: gpu_checks.sh [--cpu-smoke] [vllm,fsdp2,packing,step]" >&2; exit 2 ;;
    *) CHECKS=$arg ;;
  esac
done
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "$SMOKE" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
fi
python -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
failed=0
for check in ${CHECKS//,/ }; do
  # seconds each may take on an H100 (vLLM: two engine starts with CUDA graph capture)
  case $check in vllm) limit=230 ;; fsdp2) limit=60 ;; packing) limit=50 ;; step) limit=120 ;; *) limit=60 ;; esac
  timeout "$limit" python "$HERE/gpu_checks.py" --check "$check" $SMOKE >"$OUT/$check.log" 2>&1
  code=$?
  line=$(grep '^CHECK ' "$OUT/$check.log" | tail -1)
  if [ $code -eq 124 ]; then line="CHECK $check FAIL | error=timed out after ${limit}s"; fi
  [ -n "$line" ] || line="CHECK $check FAIL | error=exit $code before its line (see $OUT/$check.log)"
  echo "$line" | tee -a "$OUT/checks.txt"
  [ $code -eq 0 ] || failed=1
done
exit $failed
