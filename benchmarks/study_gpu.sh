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
# share: several fits on one GPU at once: compiled (cold, then warm cache), under MPS, graphed.
# study: `movegen study configs/studies/fashion-mnist.yaml --inputs $INPUTS` into $STUDY (STATE:
#        an earlier call's study-state.tar, or a folder of its files, to go on from; MPS=1: share
#        the GPU through MPS; INPUTS may be a study's inputs.tar.xz, unpacked where it was built),
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
if [[ "$INPUTS" == *.tar.xz ]]; then  # the inputs a study keeps in the repo (studies/*/inputs.tar.xz)
  # unpacked where they were built: the runs record their code stores' paths
  # (a marker names the archive: a folder holding other inputs, e.g. from study_inputs.sh, is
  # refused rather than used under the same paths; a cut unpack never takes the final name)
  to=${INPUTS_AT:-/tmp/study-work/inputs}; mark=.from-$(sha256sum "$INPUTS" | cut -c1-16)
  if [ ! -f "$to/$mark" ]; then
    [ -e "$to" ] && { echo "$to holds other inputs than $INPUTS: remove it or set INPUTS_AT"; exit 2; }
    rm -rf "$to.part" && mkdir -p "$to.part" && tar -xJf "$INPUTS" -C "$to.part" && touch "$to.part/$mark" \
      && mv "$to.part" "$to" && echo "unpacked $INPUTS into $to" || { echo "could not unpack $INPUTS"; exit 2; }
  fi
  INPUTS=$to
fi
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
share)
  # how several fits share one GPU: SHARE_ARMS at once (600 steps each), compiled
  # (reduce-overhead) with a cold then a warm compile cache, then under MPS (kernels of several
  # processes run at the same time instead of in turns) compiled and graphed, then graphed alone
  arms_share=${SHARE_ARMS:-standard lave-x1 move-x1 move-x4}; n=$(echo $arms_share | wc -w)
  ro=(--model.compile true --model.compile_mode reduce-overhead)
  share_set() {
    local label=$1 s; shift; s=$(date +%s)
    for arm in $arms_share; do speed $label-$arm $arm "$@" & done; wait
    echo "$label: $n fits of 600 steps at once, $(( $(date +%s) - s )) s wall" | tee -a $OUT/share.md
  }
  share_set 1-ro-cold "${ro[@]}"
  share_set 2-ro-warm "${ro[@]}"
  if command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mps-log; mkdir -p $W/mps $W/mps-log
    nvidia-cuda-mps-control -d && echo "MPS on"
    share_set 3-ro-warm-mps "${ro[@]}"
    share_set 4-graph-mps --model.cuda_graph true
    echo quit | nvidia-cuda-mps-control; sleep 2; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  else
    echo "no nvidia-cuda-mps-control here: no MPS sets"
  fi
  share_set 5-graph --model.cuda_graph true
  speed_table | tee -a $OUT/share.md
  for f in $W/logs/speed-*.log; do grep -iE "error|Traceback" -A3 "$f" | head -8; done
  tar -cf $OUT/logs.tar -C $W logs ;;
study)
  # STATE=FILE: a study-state.tar of an earlier call (on a machine given back since): the records,
  # metrics and evaluations of the runs that finished there; the study goes on from them.
  # MPS=1: the fits share the GPU through MPS (measured faster: `share`).
  # (a warm machine's own folder, from the call before, is newer: it is kept)
  # STATE may also be a folder of those files (studies/fashion-mnist: the study kept in the repo)
  if [ -n "${STATE:-}" ] && [ ! -f $STUDY/study.json ]; then
    mkdir -p $STUDY
    if [ -f "$STATE" ]; then tar -xf "$STATE" -C $STUDY && echo "restored $STATE"
    elif [ -d "$STATE" ]; then
      (cd "$STATE" && tar -cf - --exclude=inputs.tar.xz --exclude=README.md .) | tar -xf - -C $STUDY && echo "restored $STATE"
    fi
  fi
  if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=$W/mps CUDA_MPS_LOG_DIRECTORY=$W/mps-log; mkdir -p $W/mps $W/mps-log
    nvidia-cuda-mps-control -d && echo "MPS on"
  fi
  s=$(date +%s)
  # DRAIN=S: no fit starts in the last S seconds (the running ones go on, every finished one is
  # evaluated): for the last call before the machine goes back, where a fit finished but not
  # evaluated would be trained again
  T=${2:-540}
  timeout -s INT $T $PY -m movegen study --config ${STUDY_CONFIG:-configs/studies/fashion-mnist.yaml} --out $STUDY \
    --inputs $INPUTS --parallel ${PARALLEL:-4} ${ARMS:+--arms "[$ARMS]"} \
    ${DRAIN:+--stop_fits_after $(( T > DRAIN ? T - DRAIN : 0 ))} >> $W/logs/study.log 2>&1
  echo "study exit $? after $(( $(date +%s) - s )) s"; tail -5 $W/logs/study.log
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && { echo quit | nvidia-cuda-mps-control; sleep 2; }
  mkdir -p $OUT/study && cp -r $STUDY/study.json $STUDY/report $OUT/study/ 2>/dev/null
  # the state a later call (or session) goes on from: no checkpoints, every small file
  tar -cf $OUT/study-state.tar -C $STUDY study.json logs $(cd $STUDY && ls -d report evals 2>/dev/null) \
    $(cd $STUDY && find runs -name metrics.json -o -name run.json 2>/dev/null)
  $PY - $STUDY/study.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(f"{r['id']:55s} {r['status']:9s} steps {r.get('steps')} best {r.get('best_step')} "
          f"bits {r.get('val_bits_per_token')} evaluated {r.get('evaluated')}")
PY
  ;;
esac
