#!/usr/bin/env bash
# The GPU benchmarks for one device call: each section runs under its own time limit, writes its
# full log into $OUT and prints its table. Run from anywhere; it runs from the repository root.
#   usage: bash benchmarks/gpu.sh SECTION...
#   mix               the MoVE mix alone (move_mix)
#   block-ops         the step's fused kernels and attention variants alone, against floors (block_ops)
#   train             the training step: arms x batch x compiled/eager (train_step)
#   sampling          the sampler: standard and MoVE-x1, fast and eager paths (sampling)
#   sampling-variants decoder variants: fused one-launch layer + one CUDA graph per step vs SDPA +
#                     inductor's CUDA graphs, batch 16-256 (sampling --only)
#   vq-decode         the VQ-16 decode of an evaluation alone: fp32 as today, channels-last, compiled,
#                     bf16 autocast; speed and pixels against strict fp32 (vq_decode; VQ_VARIANTS)
#   decode-kernel     launch settings of the fused decoding kernel (decode_kernel)
#   train-variants    the standard GPT-B step at batch 256 under attention backends / compile
#                     options (train_step, one run per variant)
#   profile-train     top kernels of a training step;  profile-sample: of a fused decode
#   profile-compare   every kernel's time per training step, arms side by side (PROFILE_ARMS,
#                     default standard,move-x1,move-x4): what MoVE adds, kernel by kernel
#   ddp               Lightning DDP on every GPU of the host against one GPU (ddp)
#   peer              LlamaGen's GPT-B beside movegen's, one process (peer_llamagen; LLAMAGEN=checkout,
#                     default .llamagen: carry it to the device)
#   fid50k            one ImageNet-256 evaluation phase by phase (sample, VQ-16 decode, Inception,
#                     scores) and extract-codes throughput, random weights (fid50k; needs
#                     torch-fidelity: carry .whl/ into /tmp/site)
#   verify            the bank-gradient, MoVE kernel and fused-model GPU tests, then the train_step
#                     options that are off by default beside their baselines (TRAIN_ONLY overrides)
#   quick             under 560 s: the GPU tests of the fused model, attention and MoVE kernels, then the standard,
#                     MoVE-x1 and MoVE-x4 steps at batch 256, MoVE-x1 beside it without its default
#                     stacked QKV + router product (@norouter+nogates) and grouped by id (@grouped:
#                     its per-group floor is the one under the target, benchmarks.move_floor),
#                     MoVE-x4 beside it with one (@router+gates), then MoVE-x1 again (train)
#   bank              under 560 s: the bank gradient's kernels each alone against its byte floor on
#                     three id distributions, every one's output against the lanes kernels' (bank_grad;
#                     BANK_ARGS more arguments), then the MoVE steps with the default (layers)
#                     kernel beside the lanes kernels (train: standard, move-x1, move-x4 and each
#                     @banklanes; the runs kernel's were timed 2026-12-07)
#   dot               under 560 s: the grouped mix kernels' dot form: its GPU tests (GPT-B scale, against
#                     float64 and the lanes form; the MoVE kernel tests in both forms), the mix alone per
#                     token and grouped (lanes, the default; dot; lanes forward with dot backward) on two
#                     id distributions (move_mix; MIX_IDS), then the MoVE-x4 step beside the standard
#                     (train: move-x4 beside @mixdotbwd twice, and @mixdot)
#   tests             GPU tests: pytest -m gpu over GPU_TEST_FILES (default tests/test_kernels.py and
#                     tests/test_sample.py), those GPU_TESTS_K names (pytest -k) if set
#   bank-tests        the bank-gradient GPU tests at GPT-B scale (every kernel, stacked and in place)
#                     and the MoVE kernel tests
#   cold              the compiled MoVE-x1 and x4 steps as the first arms of a fresh process on a cold
#                     inductor cache (each form of the bank gradient's value gradients), every thread's
#                     stack printed each 60 s: each arm's first compilation, and where it stops if it
#                     does not finish (RESULTS, 2026-12-07 fourth and fifth sessions)
#   all               mix, train and sampling (the headline tables)
# Compiled kernels and autotuning choices (Triton's and inductor's caches) are kept per GPU model
# in GPU_CACHE (default .gpu-cache, git-ignored): a folder <model>/ there is used in place and
# <model>.tgz is unpacked into it first; at the end the caches go back as $OUT/<model>.tgz
# (the whole folder if it packs under 15 MiB, else inductor's cache with Triton's autotuning
# choices, else the choices alone; sized before packing): copy that file into GPU_CACHE and
# carry it to the next call (a SIGKILL at the device's limit packs nothing), so
# a fresh machine of that model does not autotune again what an earlier one did (nor compile
# what the pack holds). Timings are unchanged (the choices are the ones the autotuner measured
# on that model).
# Settings through the environment (defaults below): OUT, PYTHON, T_<SECTION> time limits, GPU_CACHE,
# TRAIN_ONLY, TRAIN_IDS, DUMP_STACKS, GPU_TEST_FILES, GPU_TESTS_K, FID_PARTS, FID_ARGS, SAMPLE_ONLY, SAMPLE_BATCHES, VARIANTS, PROFILE_ARM, PROFILE_ARMS, DDP_STEPS, LLAMAGEN, FID_ONLY,
# EXTRACT_IMAGES, EXTRACT_WORKERS, PEER_ARMS, PEER_BATCHES, PEER_IDS (e.g. uniform,zipf:0.3,zipf), MIX_IMPLS, MIX_IDS, BANK_ARGS, VQ_VARIANTS
# (SAMPLE_BATCHES= skips the sampling of `peer`).
set -u
export PYTHONUNBUFFERED=1
# each autotuner's winning configuration goes to the logs: which ones to keep where a fresh
# machine's autotuning costs too much of a call
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ $# -gt 0 ] || { sed -n '2,63p' "$0"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__)'
MODEL=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
CACHE_ROOT=${GPU_CACHE:-.gpu-cache}; CACHE=$CACHE_ROOT/${MODEL:-unknown}
mkdir -p "$CACHE"
[ -f "$CACHE.tgz" ] && tar xzf "$CACHE.tgz" -C "$CACHE" && echo "caches from $CACHE.tgz: $(du -sh "$CACHE" | cut -f1)"
CACHE=$(cd "$CACHE" && pwd)  # absolute: the processes below run from other folders too
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}
save_caches() {  # the whole folder, else inductor's cache and the choices, else the choices
  local f="$OUT/${MODEL:-unknown}.tgz" big=$((60 << 20))  # (60 MiB unpacked: about 15 packed)
  pack() { (cd "$CACHE" && { find . -name '*.autotune.json' -print0; [ $# -gt 0 ] && find "$@" -type f -print0; } \
    | tar czf "$f" --null -T -); }
  if [ "$(du -sb "$CACHE" | cut -f1)" -le $big ]; then tar czf "$f" -C "$CACHE" .
  elif [ "$(du -sb "$CACHE/inductor" 2>/dev/null | cut -f1)" -le $big ]; then pack inductor
  else pack; fi
  [ "$(stat -c %s "$f")" -gt $((15 << 20)) ] && pack  # over what comes back: the choices alone
  echo "caches: $f ($(du -h "$f" | cut -f1))"
}
trap save_caches EXIT
errors() { grep -m3 -E "Error|error:" "$1"; }
bench() { local t=$1 log=$2; shift 2; timeout "$t" $PY -m "$@" > "$OUT/$log" 2>&1 || echo "== $log: exit $?"; }

run_section() { case $1 in
mix)
  bench ${T_MIX:-150} move_mix.log benchmarks.move_mix --impls ${MIX_IMPLS:-deferred,grouped,autograd}
  grep -E "^\||^MoVE" "$OUT/move_mix.log"; errors "$OUT/move_mix.log";;
block-ops)
  bench ${T_BLOCK:-240} block_ops.log benchmarks.block_ops
  grep -E "^\||^block" "$OUT/block_ops.log"; errors "$OUT/block_ops.log";;
train)
  bench ${T_TRAIN:-330} train_step.log benchmarks.train_step --warmup 5 --iters 15 --dump-stacks ${DUMP_STACKS:-0} --ids_dist ${TRAIN_IDS:-uniform} --only \
    ${TRAIN_ONLY:-standard:256:compiled,move-x1:256:compiled,move-x4:256:compiled,lave-x1:256:compiled,standard:64:compiled,standard:256:eager,move-x4:256:eager}
  grep -E "^\{|^\||^training" "$OUT/train_step.log" | tail -40; errors "$OUT/train_step.log";;
sampling)
  bench ${T_SAMPLE:-150} sampling.log benchmarks.sampling --arms standard,move-x1 \
    --batches ${SAMPLE_BATCHES:-16,64} --paths fast,eager --iters 2
  grep -E "^\||^sampling" "$OUT/sampling.log" | tail -12; grep -E "^\{" "$OUT/sampling.log" | tail -8
  errors "$OUT/sampling.log";;
sampling-variants)
  bench ${T_SAMPLE_VARIANTS:-420} sampling_variants.log benchmarks.sampling --iters 3 --only \
    ${SAMPLE_ONLY:-standard:16:fused:graph,move-x1:16:fused:graph,standard:64:fused:graph,move-x1:64:fused:graph,standard:256:fused:graph,move-x1:256:fused:graph,standard:16:sdpa:graph,move-x1:16:sdpa:graph,standard:64:sdpa:graph,move-x1:64:sdpa:graph}
  grep -E "^\||^sampling" "$OUT/sampling_variants.log"; errors "$OUT/sampling_variants.log";;
vq-decode)
  bench ${T_VQ_DECODE:-150} vq_decode.log benchmarks.vq_decode ${VQ_VARIANTS:+--variants $VQ_VARIANTS}
  grep -E "^\||^VQ|^NVIDIA|TF32" "$OUT/vq_decode.log"; errors "$OUT/vq_decode.log";;
decode-kernel)
  bench ${T_KERNEL:-200} decode_kernel.log benchmarks.decode_kernel
  grep -E "^\||^decode" "$OUT/decode_kernel.log"; errors "$OUT/decode_kernel.log";;
train-variants)
  local v VS
  IFS=';' read -ra VS <<< "${VARIANTS:---sdpa default;--sdpa cudnn;--sdpa efficient;--sdpa default --coordinate-descent}"
  for v in "${VS[@]}"; do
    # $v unquoted on purpose: one variant is several flags
    timeout ${T_VARIANT:-200} $PY -m benchmarks.train_step --warmup 5 --iters 15 \
      --only ${TRAIN_ONLY:-standard:256:compiled} $v >> "$OUT/train_variants.log" 2>&1
    echo "== $v"; grep -E "^\|.*compiled" "$OUT/train_variants.log" | tail -1
  done;;
profile-train)
  bench ${T_PROFILE:-200} profile_train.log benchmarks.profile_step --arm ${PROFILE_ARM:-standard} --batch 256 --top 40
  tail -48 "$OUT/profile_train.log" | cut -c1-200;;
profile-compare)
  bench ${T_PROFILE_COMPARE:-420} profile_compare.log benchmarks.profile_step --batch 256 \
    --compare ${PROFILE_ARMS:-standard,move-x1,move-x4}
  grep -E "^\||^kernel" "$OUT/profile_compare.log" | head -60 | cut -c1-200; errors "$OUT/profile_compare.log";;
profile-sample)
  bench ${T_PROFILE:-200} profile_sample.log benchmarks.profile_step --sampling --arm ${PROFILE_ARM:-standard} --batch 16 --top 30
  tail -38 "$OUT/profile_sample.log" | cut -c1-200;;
peer)
  bench ${T_PEER:-420} peer.log benchmarks.peer_llamagen --llamagen "${LLAMAGEN:-.llamagen}" --warmup 5 --iters 15 \
    --arms ${PEER_ARMS:-standard,move-x1} --batches ${PEER_BATCHES:-64,256} --modes compiled --sample_batches "${SAMPLE_BATCHES-16,64,256,1024}" \
    --ids_dist ${PEER_IDS:-uniform}
  grep -E "^\||^training|^sampling" "$OUT/peer.log" | tail -24; errors "$OUT/peer.log";;
ddp)
  local n k runs=(); n=$(nvidia-smi -L | wc -l)
  for k in $( [ "$n" -gt 1 ] && echo 1 "$n" || echo 1 ); do
    rm -f "$OUT/ddp$k.json"
    bench ${T_DDP:-200} ddp$k.log benchmarks.ddp --devices "$k" --steps ${DDP_STEPS:-60} --out "$OUT/ddp$k.json"
    if [ -f "$OUT/ddp$k.json" ]; then runs+=("$OUT/ddp$k.json"); else errors "$OUT/ddp$k.log"; fi
  done
  [ ${#runs[@]} -gt 0 ] && $PY -m benchmarks.ddp --table "${runs[@]}" | grep -E "^\||^Lightning";;
fid50k)
  bench ${T_FID50K:-570} fid50k.log benchmarks.fid50k --parts ${FID_PARTS:-eval,extract} --only ${FID_ONLY:-move-x1:256:2048,standard:256:50000} \
    --extract_images ${EXTRACT_IMAGES:-1500} --extract_workers ${EXTRACT_WORKERS:-16} ${FID_ARGS:-}
  grep -E "^\||^movegen|^inputs|JPEGs" "$OUT/fid50k.log"; errors "$OUT/fid50k.log";;
verify)
  # what has not run on a GPU yet, or not in the default step: the MoVE kernel tests, then the
  # options beside their baselines (DUMP_STACKS=60: every thread's stack each 60 s if an arm hangs)
  # -vv (past addopts' -q): each test's name as it starts and ends, so a test that does not finish is named
  timeout ${T_VERIFY:-200} $PY -m pytest -vv -p no:cacheprovider -m gpu tests/test_kernels.py \
    -k "gpt_b_scale or triton_kernels_on_gpu or residual_norm_on_gpu or attention_on_gpu" > "$OUT/gpu_tests.log" 2>&1 || echo "== gpu tests: exit $?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|::test_" "$OUT/gpu_tests.log" | cut -c1-160 | tail -12
  TRAIN_ONLY=${TRAIN_ONLY:-standard:256:compiled,move-x1:256:compiled,move-x4:256:compiled,move-x1@dvstack:256:compiled,move-x4@dvstack:256:compiled,move-x4@gates:256:compiled,standard@noclipfold:256:compiled} \
    run_section train;;
quick)
  # the first call of a session where machines are scarce (under 420 s): the GPU tests of the
  # kernels changed since the last timed run, then the three arms' steps and the options to
  # decide on next (against the last table on the same card type)
  timeout ${T_QUICK_TESTS:-240} $PY -m pytest -vv -p no:cacheprovider -m gpu tests/test_kernels.py \
    -k "residual_norm_on_gpu or attention_on_gpu or triton_kernels_on_gpu" > "$OUT/gpu_tests.log" 2>&1 || echo "== gpu tests: exit $?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|::test_" "$OUT/gpu_tests.log" | cut -c1-160 | tail -8
  T_TRAIN=${T_TRAIN:-300} TRAIN_ONLY=${TRAIN_ONLY:-standard:256:compiled,move-x1:256:compiled,move-x1@norouter+nogates:256:compiled,move-x1@grouped:256:compiled,move-x4:256:compiled,move-x4@router+gates:256:compiled,move-x1:256:compiled} \
    run_section train;;
bank)
  bench ${T_BANK:-210} bank_grad.log benchmarks.bank_grad ${BANK_ARGS:-}
  grep -E "^\||^MoVE" "$OUT/bank_grad.log"; errors "$OUT/bank_grad.log"
  T_TRAIN=${T_TRAIN:-330} TRAIN_ONLY=${TRAIN_ONLY:-standard:256:compiled,move-x1:256:compiled,move-x1@banklanes:256:compiled,move-x4:256:compiled,move-x4@banklanes:256:compiled} \
    run_section train;;
dot)
  timeout ${T_DOT_TESTS:-200} $PY -m pytest -vv -p no:cacheprovider -m gpu tests/test_kernels.py \
    -k "dot_form or triton_kernels_on_gpu" > "$OUT/gpu_tests.log" 2>&1 || echo "== gpu tests: exit $?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|::test_" "$OUT/gpu_tests.log" | cut -c1-160 | tail -12
  bench ${T_MIX:-150} move_mix.log benchmarks.move_mix --impls ${MIX_IMPLS:-deferred,grouped,grouped-dotbwd,grouped-dot} --ids_dist ${MIX_IDS:-uniform,zipf:0.3}
  grep -q "^MoVE" "$OUT/move_mix.log" && grep -E "^\||^MoVE" "$OUT/move_mix.log" || grep "^{'M'" "$OUT/move_mix.log"
  errors "$OUT/move_mix.log"
  T_TRAIN=${T_TRAIN:-300} TRAIN_ONLY=${TRAIN_ONLY:-standard:256:compiled,move-x4:256:compiled,move-x4@mixdotbwd:256:compiled,move-x4@mixdot:256:compiled,move-x4:256:compiled,move-x4@mixdotbwd:256:compiled} \
    run_section train;;
tests)
  timeout ${T_TESTS:-300} $PY -m pytest -vv -p no:cacheprovider -m gpu ${GPU_TEST_FILES:-tests/test_kernels.py tests/test_sample.py} \
    ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} > "$OUT/gpu_tests.log" 2>&1 || echo "== gpu tests: exit $?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|::test_" "$OUT/gpu_tests.log" | cut -c1-160 | tail -24;;
bank-tests)
  timeout ${T_BANK_TESTS:-500} $PY -m pytest -vv -p no:cacheprovider -m gpu tests/test_kernels.py \
    -k "gpt_b_scale or triton_kernels_on_gpu" > "$OUT/gpu_tests.log" 2>&1 || echo "== gpu tests: exit $?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|::test_" "$OUT/gpu_tests.log" | cut -c1-160 | tail -20;;
cold)
  # a cold inductor cache (a warm one skips the lowering); Triton's autotuning choices kept
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) T_TRAIN=${T_TRAIN:-500} DUMP_STACKS=${DUMP_STACKS:-60} \
    TRAIN_ONLY=${TRAIN_ONLY:-move-x1:256:compiled,move-x4:256:compiled,move-x1@dvstack:256:compiled,move-x4@dvstack:256:compiled} run_section train
  grep -B2 -A30 "Thread\|Current thread" "$OUT/train_step.log" | tail -80;;
all) run_section mix; run_section train; run_section sampling;;
*) echo "unknown section $1 (see: bash benchmarks/gpu.sh)"; return 2;;
esac; }

for s in "$@"; do echo "== $s"; run_section "$s"; done
