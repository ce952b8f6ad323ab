#!/usr/bin/env bash
# One GPU call: the MoVE mix, the training step and the sampler, each under its own time limit,
# full logs in $OUT. Usage: bash benchmarks/gpu_all.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c 'import torch; print("torch", torch.__version__)'
timeout ${T_MIX:-90} python3 benchmarks/move_mix.py > $OUT/move_mix.log 2>&1; tail -8 $OUT/move_mix.log
timeout ${T_TRAIN:-330} python3 benchmarks/train_step.py --warmup 5 --iters 15 \
  --only ${TRAIN_ONLY:-standard:256:compiled,move-x1:256:compiled,move-x4:256:compiled,lave-x1:256:compiled,standard:64:compiled,standard:256:eager,move-x4:256:eager} \
  > $OUT/train_step.log 2>&1; grep -E "^\{|^\||^training" $OUT/train_step.log | tail -22; grep -m3 -E "Error|error:" $OUT/train_step.log
timeout ${T_SAMPLE:-150} python3 benchmarks/sampling.py --arms standard,move-x1 --batches ${SAMPLE_BATCHES:-16,64} --paths fast,eager --iters 2 \
  > $OUT/sampling.log 2>&1; grep -E "^\||^sampling" $OUT/sampling.log | tail -12; grep -E "^\{" $OUT/sampling.log | tail -8; grep -m3 -E "Error|error:" $OUT/sampling.log
