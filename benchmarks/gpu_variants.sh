#!/usr/bin/env bash
# Variant sweeps for one GPU call each; logs go to $OUT. Usage: bash benchmarks/gpu_variants.sh SECTION...
#   sampling        decode variants (fused one-launch layer vs SDPA, the step in one CUDA graph
#                   either way)
#   decode-kernel   launch settings of the fused decoding kernel
#   train-variants  the standard GPT-B step at batch 256 under attention backends / compile options
#   profile-train   top kernels of a standard training step;  profile-sample: of a fused decode
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for s in "$@"; do case $s in
sampling)
  timeout ${T_SAMPLE:-420} python3 benchmarks/sampling.py --iters 3 --only \
    ${SAMPLE_ONLY:-standard:16:fused:graph,move-x1:16:fused:graph,standard:64:fused:graph,move-x1:64:fused:graph,standard:256:fused:graph,move-x1:256:fused:graph,standard:16:sdpa:graph,move-x1:16:sdpa:graph,standard:64:sdpa:graph,move-x1:64:sdpa:graph} \
    > "$OUT/sampling.log" 2>&1; grep -E "^\||^sampling" "$OUT/sampling.log"; grep -m3 -E "Error|error:" "$OUT/sampling.log";;
train-variants)
  IFS=';' read -ra VS <<< "${VARIANTS:---sdpa default;--sdpa cudnn;--sdpa efficient;--sdpa default --coordinate-descent}"
  for v in "${VS[@]}"; do
    timeout ${T_VARIANT:-200} python3 benchmarks/train_step.py --warmup 5 --iters 15 \
      --only ${TRAIN_ONLY:-standard:256:compiled} $v >> "$OUT/train_variants.log" 2>&1
    echo "== $v"; grep -E "^\|.*compiled" "$OUT/train_variants.log" | tail -1
  done;;
decode-kernel)
  timeout ${T_KERNEL:-200} python3 benchmarks/decode_kernel.py > "$OUT/decode_kernel.log" 2>&1
  grep -E "^\||^decode" "$OUT/decode_kernel.log"; grep -m3 -E "Error|error:" "$OUT/decode_kernel.log";;
profile-train)
  timeout ${T_PROFILE:-200} python3 benchmarks/profile_step.py --arm ${PROFILE_ARM:-standard} --batch 256 --top 40 \
    > "$OUT/profile_train.log" 2>&1; tail -48 "$OUT/profile_train.log" | cut -c1-200;;
profile-sample)
  timeout ${T_PROFILE:-200} python3 benchmarks/profile_step.py --sampling --arm ${PROFILE_ARM:-standard} --batch 16 --top 30 \
    > "$OUT/profile_sample.log" 2>&1; tail -38 "$OUT/profile_sample.log" | cut -c1-200;;
esac; done
