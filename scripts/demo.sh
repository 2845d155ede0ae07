#!/usr/bin/env bash
# The main job on the bundled example: segment grey matter in the held-out slices of a real MRI
# volume (the MNI152 T1 template, fetched once from the nilearn wheel on PyPI) with the bundled
# Med-SA model (examples/models/mni152_gm.safetensors: a small SAM trained from scratch on white
# matter, adapted to grey matter with adapters only; scripts/train-mni152.sh reproduces it).
# Prompts per slice come from the tissue labels (bounding box + one click inside); the masks are
# written on the scan's grid with an overview PNG, and scored (Dice, IoU, HD95) against the
# labels. Outputs go to examples/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-cuda.sh      # nvcc 13.0 from PyPI for the CUDA kernels (once, into .tools/)
bash scripts/fetch-example.sh   # examples/data/mni152_*.nii.gz (once)
python3 scripts/prepare-mni152.py   # training / held-out slabs + tissue labels (once)
cargo build --release --quiet
bin=target/release/medsa-engine
model=examples/models/mni152_gm.safetensors
val=examples/data/mni152_val
mkdir -p examples/out
"$bin" info "$model"
# The model's metadata supplies what it was trained with: intensity window 0..255, the medsa
# preset and label id 2 (grey matter); segment says so on standard error.
"$bin" segment --checkpoint "$model" -i "$val/images" -o examples/out \
  --prompt-from-label "$val/labels" --click --labels "$val/labels" --overview
echo "outputs: examples/out/mni152.nii.gz (grey matter, label 1), mni152_overview.png, metrics.csv"
