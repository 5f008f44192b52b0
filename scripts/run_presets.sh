#!/usr/bin/env bash
# Every built-in preset for a few steps under one trainer config, validating before, halfway
# and after, one line per preset in $OUT/presets.txt (exit status, seconds, last score):
#   bash scripts/run_presets.sh fsdp2_cpu            # FSDP2 on 2 CPU processes
#   bash scripts/run_presets.sh fsdp2_gpu gpu_out    # every visible GPU
# EXPERIMENTS picks presets (the SmolLM2 ones need scripts/prepare_smollm2.py first); STEPS
# the steps per run (default 4); TIMEOUT the seconds one run may take (default 900).
set -u
TRAINER=${1:?usage: run_presets.sh TRAINER [OUT]}
OUT=${2:-presets_out}
STEPS=${STEPS:-4}
EXPERIMENTS=${EXPERIMENTS:-sft dft distill gkd rl on_policy_distill dpo online_dpo self_distill}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# a machine without vLLM (the lent GPU's Python, say) samples smollm2_grpo through hf
engine=""
python -c "import vllm" >/dev/null 2>&1 || engine="data_source.sampling.engine=hf"
status=0
for experiment in $EXPERIMENTS; do
  case $experiment in
    smollm2_grpo) limits="task.val_batch_size=16 +trainer.limit_val_batches=1 $engine" ;;  # 16 held-out questions
    smollm2_*) limits="task.val_batch_size=16 +trainer.limit_val_batches=1" ;;
    *) limits="task.num_val=32" ;;
  esac
  log="$OUT/${TRAINER}_$experiment.log"
  start=$(date +%s)
  timeout "${TIMEOUT:-900}" python scripts/train.py experiment="$experiment" trainer="$TRAINER" \
    trainer.max_steps="$STEPS" trainer.val_check_interval=$(( (STEPS + 1) / 2 )) $limits save_policy=null \
    hydra.run.dir="$OUT/runs/${TRAINER}_$experiment" > "$log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "$TRAINER $experiment rc=$rc $(( $(date +%s) - start ))s $(grep -oE 'val/[a-z_]+ = [0-9.]+' "$log" | tail -1)" \
    | tee -a "$OUT/presets.txt"
done
exit $status
