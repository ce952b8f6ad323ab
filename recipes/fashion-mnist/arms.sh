#!/usr/bin/env bash
# Fashion-MNIST first look on one GPU: codes from a trained tokenizer, the four arms (standard,
# LaVE-x1, MoVE-x1, MoVE-x4; same steps, seed and data order), the evaluation classifier, then
# FID/IS/KID + bits/token for every arm. Prints a table last; everything small lands in $OUT.
#   usage: bash recipes/fashion-mnist/arms.sh TOKENIZER_CKPT DATA_ROOT [MAX_STEPS]
# (runs from the repository root whatever the current folder; relative arguments are taken from
# the folder it was started in)
set -uo pipefail
TOK=$(realpath "$1"); DATA_ROOT=$(realpath "$2"); STEPS=${3:-2000}
W=$(realpath -m "${WORK:-/tmp/fm}"); OUT=$(realpath -m "${OUT:-$W/out}")
cd "$(dirname "$0")/../.."
mkdir -p "$W" "$OUT"
mg() { python3 -m movegen.cli "$@"; }
mkdir -p $W/tokenizer && cp "$TOK" $W/tokenizer/tokenizer.ckpt
for s in train val; do
  mg extract-codes --tokenizer $W/tokenizer/tokenizer.ckpt --data.root "$DATA_ROOT" --split $s --out $W/codes-$s --overwrite 2>&1 | grep -v "it/s" | tail -1
done
pids=()
for arm in standard lave-x1 move-x1 move-x4; do
  mg fit --config configs/fashion-mnist/$arm.yaml --data.codes $W/codes-train --data.val_codes $W/codes-val --out $W/$arm \
     --trainer.max_steps $STEPS > $W/$arm.log 2>&1 &
  pids+=($!)
done
mg fit-classifier --data.name fashion-mnist --data.root "$DATA_ROOT" --data.num_workers 2 --out $W/classifier \
   --trainer.max_epochs 12 --data.batch_size 256 > $W/classifier.log 2>&1 &
pids+=($!)
for p in "${pids[@]}"; do wait $p; done
for arm in standard lave-x1 move-x1 move-x4; do tail -n 1 $W/$arm.log; done
tail -n 1 $W/classifier.log
models=(); for arm in standard lave-x1 move-x1 move-x4; do [ -f $W/$arm/model.ckpt ] && models+=("$W/$arm/model.ckpt"); done
list=$(IFS=,; echo "[${models[*]}]")
mg evaluate --model "$list" --features classifier:$W/classifier/classifier.ckpt --num_samples 10000 \
   --sampling.cfg_scale 2.0 --seed 0 --batch_size 1000 --data.root "$DATA_ROOT" --cache_dir $W/cache --out $W/results 2>&1 | grep -v "it/s"
mg sample --model $W/move-x4/model.ckpt --classes all --per_class 12 --sampling.cfg_scale 2.0 --out $OUT/grid-move-x4.png 2>&1 | tail -1
mg report --results $W/results --out $W/report 2>&1 | tail -1
python3 - "$W" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
print(f"{'arm':10s} {'best bits':>10s} {'best step':>9s} {'final bits':>10s} {'params M':>9s} {'FID':>8s} {'IS':>6s} {'KID':>8s}")
for arm in ["standard", "lave-x1", "move-x1", "move-x4"]:
    p = w / arm / "metrics.json"
    if not p.exists():
        print(arm, "no metrics"); continue
    m = json.loads(p.read_text())
    r = json.loads((w / "results" / f"{arm}.json").read_text()) if (w / "results" / f"{arm}.json").exists() else {}
    print(f"{arm:10s} {m['val_bits_per_token']:10.4f} {m['best_step']:9d} {m['final_val_bits_per_token']:10.4f} "
          f"{m['params_total']/1e6:9.2f} {r.get('fid', float('nan')):8.3f} {r.get('is', float('nan')):6.3f} {r.get('kid', float('nan')):8.4f}")
c = w / "classifier" / "metrics.json"
if c.exists():
    print("classifier", json.loads(c.read_text()))
PY
tar czf $OUT/fashion_arms.tar.gz -C $W --exclude='*.ckpt' --exclude='*.npy' --exclude='cache' --exclude='logs' \
  standard lave-x1 move-x1 move-x4 classifier results report standard.log lave-x1.log move-x1.log move-x4.log classifier.log 2>/dev/null
cp $W/classifier/classifier.ckpt $OUT/ 2>/dev/null || true
