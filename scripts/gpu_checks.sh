#!/usr/bin/env bash
# The GPU checks, in two parts meant to fit one 10-minute device call each (the times below
# are estimates from earlier H200 runs of their pieces, not yet timed as parts):
#   bash scripts/gpu_checks.sh bench     # an estimated 6 minutes: the whole-step benchmark at the 0.5B
#                                        # shape, eager and with the compiled loss, and the
#                                        # loss-head benchmark, eager and compiled
#   bash scripts/gpu_checks.sh presets   # an estimated 6 minutes: every built-in preset for 10 steps
#                                        # under trainer=gpu and trainer=fsdp2_gpu (every visible GPU)
#   bash scripts/gpu_checks.sh           # both
# Results land in $OUT (default gpu_out/): step.jsonl, objective.json, presets.txt.
set -u
PART=${1:-all}
case $PART in bench|presets|all) ;; *) echo "usage: gpu_checks.sh [bench|presets|all]" >&2; exit 2 ;; esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

if [ "$PART" != presets ]; then
STEP_SHAPE="--device cuda --precision bf16-mixed --hidden 1024 --layers 12 --vocab 151936 --batch 16 --prompt 128
  --response 384 --gen 64 --groups 4 --samples 16 --steps 5 --warmup 2"
echo "== whole step: project vs plain loop, 0.5B shape, bf16-mixed"
timeout 300 python scripts/benchmark_step.py $STEP_SHAPE --out "$OUT/step.jsonl" 2>&1 | tee "$OUT/step.txt"
echo "== whole step, the loss's chunk math compiled (SFT and the distillations)"
timeout 240 python scripts/benchmark_step.py $STEP_SHAPE --compile --methods sft,distill,cached_distill \
  --out "$OUT/step.jsonl" 2>&1 | tee "$OUT/step_compiled.txt"

echo "== loss head: chunked and compiled vs plain logits, bf16, 16k tokens, hidden 4096, vocab 151936"
timeout 200 python scripts/benchmark_objective.py --device cuda --dtype bfloat16 --tokens 16384 --hidden 4096 \
  --vocab 151936 --repeats 5 --compile --out "$OUT/objective.json" 2>&1 | tee "$OUT/objective.txt"

fi

if [ "$PART" != bench ]; then
echo "== every preset on trainer=gpu and trainer=fsdp2_gpu (validation before, during and after)"
for trainer in gpu fsdp2_gpu; do
  STEPS=10 TIMEOUT=60 bash scripts/run_presets.sh $trainer "$OUT"
done
fi
