#!/usr/bin/env bash
# Installs nvcc 13.0.x from PyPI into .tools/cuda-pkgs (ignored by git), once. No GPU or CUDA
# installation is needed: this is only the compiler for kernels/*.cu. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/cuda-pkgs
if [ -x "$dest/nvidia/cu13/bin/nvcc" ] && "$dest/nvidia/cu13/bin/nvcc" --version | grep -q "release 13.0"; then
  exit 0
fi
echo "installing nvcc 13.0 from PyPI into $dest ..."
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$dest" --upgrade \
  "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
"$dest/nvidia/cu13/bin/nvcc" --version | tail -1
