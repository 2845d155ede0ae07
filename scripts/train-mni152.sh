#!/usr/bin/env bash
# Med-SA in miniature on the MNI152 template (CPU, about 20 minutes on 2 cores):
#   1. a small SAM (1.4 M parameters, 128x128 input) trained from scratch on white matter
#      (--trainable all);
#   2. that model adapted to grey matter by training adapters only (encoder Space/MLP adapters
#      and the decoder's HyP-Adpt/MLP/Cross adapters, added to the base and started as identity).
# The merged result is examples/models/mni152_gm.safetensors, the README's bundled model.
# Logs and checkpoints go to examples/work/ (ignored by git). Set STEPS to shorten a trial run.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-1500}
work=examples/work
mkdir -p "$work" examples/models
bash scripts/fetch-example.sh
python3 scripts/prepare-mni152.py
cargo build --release --quiet --bin medsa-engine
bin=target/release/medsa-engine
common=(--data examples/data/mni152_train --val-data examples/data/mni152_val
        --intensity window:0,255 --batch-size 8 --box-jitter 4 --lr 1e-3 --warmup 100
        --steps "$steps" --val-every 250 --save-every 250 --seed 7 --flip)

"$bin" init --out "$work/scratch.safetensors" --size 128 --patch 8 --embed 96 --depth 4 \
  --heads 4 --window 8 --prompt-dim 128 --decoder-mlp 512 --seed 1

echo "== stage 1: from scratch on white matter (label 1), --trainable all"
"$bin" train --checkpoint "$work/scratch.safetensors" --out "$work/wm" --trainable all \
  --add-adapters none --label-id 1 --weight-decay 0.05 "${common[@]}"
"$bin" merge --checkpoint "$work/scratch.safetensors" --adapter "$work/wm/best.safetensors" \
  --out "$work/wm_model.safetensors"

echo "== stage 2: adapt to grey matter (label 2), adapters only"
"$bin" train --checkpoint "$work/wm_model.safetensors" --out "$work/gm" --trainable adapters \
  --add-adapters encoder+decoder --label-id 2 "${common[@]}"
"$bin" merge --checkpoint "$work/wm_model.safetensors" --adapter "$work/gm/best.safetensors" \
  --out examples/models/mni152_gm.safetensors
ls -l examples/models/mni152_gm.safetensors
