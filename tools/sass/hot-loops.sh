#!/usr/bin/env bash
# Static instruction mix of the attention kernel's key loop, per option, on the vit_b global
# blocks' shape (tools/sass/probe_attention.cu), from the SASS that nvcc 13.0 emits. No GPU
# needed: what a warp issues per 64-key tile, to set against a measured kernel time (issue
# slots per tile at that time). Developer tool, not part of the build or the tests.
#
#   tools/sass/hot-loops.sh [ARCH]        # ARCH: 90a (default), 80, 86, 89
#
# Needs nvcc (scripts/setup-cuda.sh) and installs nvdisasm from PyPI into .tools/nvdisasm
# (ignored by git) on first use; the nvcc wheels carry no disassembler.
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:-90a}
scripts/setup-cuda.sh >/dev/null
nvcc=.tools/cuda-pkgs/nvidia/cu13/bin/nvcc
dis=.tools/nvdisasm/nvidia/cu13/bin/nvdisasm
if [ ! -x "$dis" ]; then
  echo "installing nvdisasm from PyPI into .tools/nvdisasm ..." >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target .tools/nvdisasm "nvidia-cuda-nvdisasm==13.2.*"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$nvcc" -cubin -O3 -std=c++17 -I kernels -gencode "arch=compute_$arch,code=sm_$arch" \
  tools/sass/probe_attention.cu -o "$work/probe.cubin"
"$dis" -c "$work/probe.cubin" >"$work/probe.sass"
python3 tools/sass/key_loop.py "$work/probe.sass" probe_
