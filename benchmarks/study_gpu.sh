#!/usr/bin/env bash
# The Fashion-MNIST study on one GPU, from inputs built before (benchmarks/study_inputs.sh).
#   usage: OUT=DIR INPUTS=DIR bash benchmarks/study_gpu.sh check|study [SECONDS]
# check: the graphed training step's GPU tests; fit speed of 600-step runs (standard and
#        MoVE-x4 alone, eager and --model.cuda_graph true; then 4 graphed runs at once); the
#        resume check with the graphed step.
# modes: fit speed of 600-step runs under each step mode (eager, --model.cuda_graph, --model.compile,
#        --model.compile_mode reduce-overhead), standard and MoVE-x4 alone, then 4 arms at once in
#        the fastest graphed mode. INPUTS=synthetic writes random code stores of the Fashion-MNIST
#        shapes (55,000 + 5,000 items of 8x8 codes, K = 1024, 10 classes): the same compute.
# study: `movegen study configs/studies/fashion-mnist.yaml --inputs $INPUTS` into $STUDY,
#        interrupted (SIGINT: the fits save their state) after SECONDS (default 540) so that
#        the call ends cleanly; a second call resumes it. Copies study.json, the report and the
#        logs into $OUT.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/study-gpu}; INPUTS=${INPUTS:?the inputs folder}; STUDY=${STUDY:-runs/fashion-study}
W=${WORK:-/tmp/study-gpu-work}; mkdir -p "$OUT" "$W/logs"
PY=${PYTHON:-python3}
mg() { $PY -m movegen "$@"; }
if [ "$INPUTS" = synthetic ]; then
  INPUTS=$W/synthetic
  $PY -c "import sys; from pathlib import Path; from benchmarks.ddp import make_store
for name, n in (('codes-train', 55000), ('codes-val', 5000)): make_store(Path(sys.argv[1]) / name, n, 1024, 64, 10)" "$INPUTS"
fi
speed() {  # label, arm, then fit flags
  local label=$1 arm=$2; shift 2
  mg fit --config configs/fashion-mnist/$arm.yaml --data.codes $INPUTS/codes-train --data.val_codes $INPUTS/codes-val \
    --trainer.max_steps 600 --trainer.val_check_interval 100 --out $W/speed/$label "$@" > $W/logs/speed-$label.log 2>&1
}
speed_table() {
  $PY - "$W/speed" <<'PY'
import json, sys, pathlib
print("| run | steps | train s | ms/step | best val bits (step) |")
print("|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = d / "metrics.json"
    if m.exists():
        j = json.loads(m.read_text())
        print(f"| {d.name} | {j['steps']} | {j['train_seconds']} | {1000 * j['train_seconds'] / j['steps']:.1f} | "
              f"{j['val_bits_per_token']:.4f} ({j['best_step']}) |")
    else:
        print(f"| {d.name} | failed: see its log |")
PY
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
case "$1" in
check)
  $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_train_gpu.py 2>&1 | tail -3
  for arm in standard move-x4; do
    s=$(date +%s); speed $arm-eager $arm; echo "$arm alone, eager: $(( $(date +%s) - s )) s wall, exit $?"
    s=$(date +%s); speed $arm-graph $arm --model.cuda_graph true; echo "$arm alone, graphed: $(( $(date +%s) - s )) s wall"
  done
  s=$(date +%s)
  for arm in standard lave-x1 move-x1 move-x4; do speed par-$arm $arm --model.cuda_graph true & done
  wait; echo "4 graphed arms at once: $(( $(date +%s) - s )) s wall"
  speed_table
  for f in $W/logs/speed-*graph*.log; do grep -iE "error|Traceback" -A3 "$f" | head -8; done
  $PY -m benchmarks.resume --config configs/fashion-mnist/move-x1.yaml --codes $INPUTS/codes-train \
    --val_codes $INPUTS/codes-val --steps 400 --kill_at 200 --every 50 --work $W/resume \
    --fit_flags '--model.cuda_graph true' 2>&1 | tail -12
  tar -cf $OUT/logs.tar -C $W logs ;;
modes)
  for arm in standard move-x4; do
    speed $arm-1-eager $arm
    speed $arm-2-graph $arm --model.cuda_graph true
    speed $arm-3-compile $arm --model.compile true
    speed $arm-4-compile-ro $arm --model.compile true --model.compile_mode reduce-overhead
    speed_table > $OUT/modes.md  # kept in $OUT as it goes: a timeout keeps what finished
  done
  s=$(date +%s)
  for arm in standard lave-x1 move-x1 move-x4; do speed par-$arm $arm --model.compile true --model.compile_mode reduce-overhead & done
  wait; echo "4 arms at once, compile reduce-overhead: $(( $(date +%s) - s )) s wall"
  speed_table | tee $OUT/modes.md
  for f in $W/logs/speed-*.log; do grep -iE "error|Traceback" -A3 "$f" | head -8; done
  tar -cf $OUT/logs.tar -C $W logs ;;
study)
  timeout -s INT ${2:-540} $PY -m movegen study --config ${STUDY_CONFIG:-configs/studies/fashion-mnist.yaml} --out $STUDY \
    --inputs $INPUTS --parallel ${PARALLEL:-4} ${ARMS:+--arms "[$ARMS]"} > $W/logs/study.log 2>&1
  echo "study exit $?"; tail -5 $W/logs/study.log
  mkdir -p $OUT/study && cp -r $STUDY/study.json $STUDY/report $OUT/study/ 2>/dev/null
  tar -cf $OUT/study-logs.tar -C $STUDY logs $(cd $STUDY && ls -d evals 2>/dev/null) \
    $(cd $STUDY && find runs -name metrics.json -o -name run.json 2>/dev/null) ;;
esac
