#!/usr/bin/env bash
# One device call that builds the Fashion-MNIST study's inputs on a GPU and measures what the
# study's plan rests on; the inputs come back small enough to carry into the next call.
#   usage: OUT=DIR DATA_ROOT=DIR bash benchmarks/study_inputs.sh
# 1. the Fashion-MNIST tokenizer (tokenizers/fashion-mnist, TOK_STEPS steps, at most TOK_TIME)
#    and the evaluation classifier, side by side on the GPU;
# 2. train/val code stores from the tokenizer; the inputs laid out as a study's OUT/inputs
#    (tokenizer/, codes-train/, codes-val/, classifier/) in inputs-codes-train.tar,
#    inputs-tokenizer.tar and inputs-rest.tar (each under the 16 MiB a device call returns; untar
#    all three into one folder and pass it as `movegen study --inputs`);
# 3. whole-fit cost of the step modes (600 steps of the standard arm alone, each fit's wall time
#    with its start and compilation, under each mode of MODES) and one evaluation of the first
#    (10,000 samples, the study's protocol) with the seconds of each phase; SPEED=0 stops after 2.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/study-inputs}; W=${WORK:-/tmp/study-work}; mkdir -p "$OUT" "$W/logs" "$W/inputs"
DATA_ROOT=${DATA_ROOT:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
mg() { $PY -m movegen "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
t0=$(date +%s)
I=$W/inputs
mg fit-tokenizer --config tokenizers/fashion-mnist/config.yaml --data.root "$DATA_ROOT" --out $I/tokenizer \
  --trainer.max_steps ${TOK_STEPS:-4000} --trainer.max_time ${TOK_TIME:-00:00:05:00} --trainer.check_val_every_n_epoch 1000 \
  > $W/logs/tokenizer.log 2>&1 &
tok=$!
mg fit-classifier --data.name fashion-mnist --data.root "$DATA_ROOT" --out $I/classifier --trainer.max_epochs 12 \
  --data.batch_size 256 --data.num_workers 2 > $W/logs/classifier.log 2>&1 &
cls=$!
wait $tok; echo "tokenizer: exit $? after $(( $(date +%s) - t0 )) s"; grep -E "psnr|wrote|Error" $W/logs/tokenizer.log | tail -4
for s in train val; do
  mg extract-codes --tokenizer $I/tokenizer/tokenizer.ckpt --data.root "$DATA_ROOT" --split $s --out $I/codes-$s \
    >> $W/logs/extract.log 2>&1 || echo "extract $s failed"
done
tail -2 $W/logs/extract.log
wait $cls; echo "classifier: exit $? after $(( $(date +%s) - t0 )) s"; tail -1 $W/logs/classifier.log
tar -cf $OUT/inputs-codes-train.tar -C $I codes-train
tar -cf $OUT/inputs-tokenizer.tar -C $I tokenizer/tokenizer.ckpt tokenizer/metrics.json
tar -cf $OUT/inputs-rest.tar -C $I codes-val classifier/classifier.ckpt classifier/metrics.json
echo "inputs: $(( $(date +%s) - t0 )) s"
[ "${SPEED:-1}" = 1 ] || { tar -cf $OUT/logs-inputs.tar -C $W logs; ls -la $OUT; exit 0; }
for mode in ${MODES:-graph compile-ro}; do
  case $mode in
    eager) flags=();;
    graph) flags=(--model.cuda_graph true);;
    compile) flags=(--model.compile true);;
    compile-ro) flags=(--model.compile true --model.compile_mode reduce-overhead);;
  esac
  s=$(date +%s)
  mg fit --config configs/fashion-mnist/standard.yaml --data.codes $I/codes-train --data.val_codes $I/codes-val \
    --trainer.max_steps 600 --trainer.val_check_interval 100 --out $W/speed/$mode "${flags[@]}" > $W/logs/speed-$mode.log 2>&1
  echo "fit $mode: exit $?, $(( $(date +%s) - s )) s wall"
done
$PY - "$W/speed" <<'PY'
import json, sys, pathlib
print("| mode | steps | train s | ms/step | best val bits (step) |")
print("|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = d / "metrics.json"
    if m.exists():
        j = json.loads(m.read_text())
        print(f"| {d.name} | {j['steps']} | {j['train_seconds']} | {1000 * j['train_seconds'] / j['steps']:.1f} | "
              f"{j['val_bits_per_token']:.4f} ({j['best_step']}) |")
PY
first=$(ls -d $W/speed/* | head -1)
s=$(date +%s)
mg evaluate --model $first/model.ckpt --features classifier:$I/classifier/classifier.ckpt --num_samples 10000 \
  --batch_size 1000 --seed 0 --ref_splits '[test, train]' --cache_dir $W/cache --out $W/eval --data.root "$DATA_ROOT" \
  --sampling.cfg_scale 2.0 > $W/logs/evaluate.log 2>&1
echo "evaluate: exit $?, $(( $(date +%s) - s )) s wall"
$PY -c "import json, glob; r = json.load(open(glob.glob('$W/eval/*.json')[0])); print('fid', r['fid'], 'phases', r['seconds'])"
tail -3 $W/logs/evaluate.log
tar -cf $OUT/logs.tar -C $W logs
ls -la $OUT; echo "total $(( $(date +%s) - t0 )) s"
