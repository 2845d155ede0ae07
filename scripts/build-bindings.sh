#!/usr/bin/env bash
# Builds the library's two bindings: the Python wheel (PyO3 + maturin, abi3 for CPython >= 3.9)
# into target/wheels/, and the C ABI library target/release/libmedsa_c.so (header:
# include/medsa.h). The build tools (maturin, and numpy/pytest for the tests) go into .venv-py/
# once (ignored by git). The default build includes the CUDA backend, like medsa-engine's: nvcc
# comes from scripts/setup-cuda.sh; the wheel still runs without CUDA or a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cuda.sh
maturin_version=1.16.0
if [ "$(.venv-py/bin/maturin --version 2>/dev/null)" != "maturin $maturin_version" ]; then
  echo "installing maturin $maturin_version into .venv-py ..."
  python3 -m venv .venv-py
  .venv-py/bin/pip install --quiet --disable-pip-version-check "maturin==$maturin_version"
fi
rm -f target/wheels/medsa-*.whl
.venv-py/bin/maturin build --quiet --release --strip -m bindings/python/Cargo.toml -o target/wheels
cargo build --quiet --release -p medsa-c
ls target/wheels/medsa-*.whl target/release/libmedsa_c.so
