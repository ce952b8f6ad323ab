#!/usr/bin/env bash
# One device call that builds the Fashion-MNIST study's inputs on a GPU and measures what the
# study's plan rests on; the inputs come back small enough to carry into the next call.
#   usage: OUT=DIR DATA_ROOT=DIR bash benchmarks/study_inputs.sh
# 1. the Fashion-MNIST tokenizer (tokenizers/fashion-mnist, TOK_STEPS steps), the evaluation
#    classifier, and the digits resume check (benchmarks.resume), side by side on the GPU;
# 2. train/val code stores from the tokenizer;
# 3. fit speed: the standard arm alone (eager and compiled), then every study arm at once.
# Writes tokenizer.ckpt, codes-train.tar, codes-val.tar, classifier.tar and logs.tar into $OUT.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/study-inputs}; W=${WORK:-/tmp/study-work}; mkdir -p "$OUT" "$W/logs"
DATA_ROOT=${DATA_ROOT:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
mg() { $PY -m movegen "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
t0=$(date +%s)
mg fit-tokenizer --config tokenizers/fashion-mnist/config.yaml --data.root "$DATA_ROOT" --out $W/tokenizer \
  --trainer.max_steps ${TOK_STEPS:-4000} --trainer.max_time 00:00:05:00 --trainer.check_val_every_n_epoch 1000 \
  > $W/logs/tokenizer.log 2>&1 &
tok=$!
mg fit-classifier --data.name fashion-mnist --data.root "$DATA_ROOT" --out $W/classifier --trainer.max_epochs 12 \
  --data.batch_size 256 --data.num_workers 2 > $W/logs/classifier.log 2>&1 &
cls=$!
( mg fit-tokenizer --config tokenizers/digits/config.yaml --out $W/dtok --trainer.max_steps 400 \
    --trainer.check_val_every_n_epoch 1000 > $W/logs/digits.log 2>&1 &&
  for s in train val; do mg extract-codes --tokenizer $W/dtok/tokenizer.ckpt --split $s --out $W/dcodes-$s >> $W/logs/digits.log 2>&1; done &&
  $PY -m benchmarks.resume --codes $W/dcodes-train --val_codes $W/dcodes-val --steps 1000 --kill_at 500 \
    --work $W/resume > $W/logs/resume.log 2>&1 ) &
res=$!
wait $tok; echo "tokenizer: exit $? after $(( $(date +%s) - t0 )) s"; grep -E "psnr|wrote|Error" $W/logs/tokenizer.log | tail -4
for s in train val; do
  mg extract-codes --tokenizer $W/tokenizer/tokenizer.ckpt --data.root "$DATA_ROOT" --split $s --out $W/codes-$s \
    >> $W/logs/extract.log 2>&1 || echo "extract $s failed"
done
tail -2 $W/logs/extract.log
cp $W/tokenizer/tokenizer.ckpt $OUT/
tar -cf $OUT/codes-train.tar -C $W codes-train; tar -cf $OUT/codes-val.tar -C $W codes-val
wait $cls; echo "classifier: exit $?"; tail -1 $W/logs/classifier.log
tar -cf $OUT/classifier.tar -C $W classifier/classifier.ckpt classifier/metrics.json
speed() {  # name, then fit flags
  local name=$1; shift
  mg fit --config configs/fashion-mnist/$name.yaml --data.codes $W/codes-train --data.val_codes $W/codes-val \
    --trainer.max_steps 600 --trainer.val_check_interval 100 "$@" > $W/logs/speed-$name-$RANDOM.log 2>&1
}
s=$(date +%s); speed standard --out $W/speed/alone-eager; echo "standard alone, eager: $(( $(date +%s) - s )) s wall"
s=$(date +%s); speed standard --out $W/speed/alone-compiled --model.compile true; echo "standard alone, compiled: $(( $(date +%s) - s )) s wall"
s=$(date +%s)
for arm in standard lave-x1 move-x1 move-x2 move-x4; do speed $arm --out $W/speed/par-$arm & done
speed move-x4 --out $W/speed/par-move-x8 --model.config.memory_density 8 &
speed standard --out $W/speed/par-dense --model.config.n_layer 9 --model.config.n_embd 576 &
wait; echo "7 arms at once, eager: $(( $(date +%s) - s )) s wall"
$PY - "$W/speed" <<'PY'
import json, sys, pathlib
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = d / "metrics.json"
    if m.exists():
        j = json.loads(m.read_text())
        print(f"{d.name:22s} train {j['train_seconds']:6.1f} s  best val {j['val_bits_per_token']:.4f} bits  steps {j['steps']}")
    else:
        print(f"{d.name:22s} no metrics.json")
PY
wait $res; echo "resume check: exit $?"; cat $W/logs/resume.log | tail -30
tar -cf $OUT/logs.tar -C $W logs
ls -la $OUT; echo "total $(( $(date +%s) - t0 )) s"
