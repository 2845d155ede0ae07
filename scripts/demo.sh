#!/usr/bin/env bash
# The main job on the bundled example: segment a real MRI volume (the MNI152 T1 template, fetched
# once from the nilearn wheel on PyPI) from a prompt file, writing a NIfTI mask on the scan's grid
# and a PNG overview; then a 2D image. Outputs go to examples/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-cuda.sh     # nvcc 13.0 from PyPI for the CUDA kernels (once, into .tools/)
bash scripts/fetch-example.sh  # examples/data/mni152_*.nii.gz (once)
cargo build --release --quiet
bin=target/release/medsa-engine
# Small random-weight Med-SA models from the golden tests (see README: the pipeline, not a
# meaningful segmentation, until trained adapters are bundled).
volume_model=tests/fixtures/volume/weights.safetensors
image_model=tests/fixtures/tiny/weights.safetensors
mkdir -p examples/out
"$bin" info "$volume_model"
"$bin" segment --checkpoint "$volume_model" -i examples/mni152.json -o examples/out \
  --intensity mr --chunk 8 --overview
"$bin" segment --checkpoint "$image_model" --image examples/phantom.png \
  --point 128,80 --box 100,55,165,115 --multimask --out examples/out/phantom-mask.png
echo "outputs: examples/out/mni152_t1_mask.nii.gz (+ _overview.png), examples/out/phantom-mask.png"
