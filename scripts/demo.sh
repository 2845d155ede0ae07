#!/usr/bin/env bash
# The main job on the bundled example: build medsa-engine, show the model it loads, and segment
# examples/phantom.png from a point and a box. Writes examples/out/phantom-mask.png.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-cuda.sh     # nvcc 13.0 from PyPI for the CUDA kernels (once, into .tools/)
cargo build --release --quiet
bin=target/release/medsa-engine
model=tests/fixtures/tiny/weights.safetensors   # a tiny random-weight Med-SA model (see README)
mkdir -p examples/out
"$bin" info "$model"
"$bin" segment --checkpoint "$model" --image examples/phantom.png \
  --point 128,80 --box 100,55,165,115 --multimask --out examples/out/phantom-mask.png
