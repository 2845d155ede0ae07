#!/usr/bin/env bash
# Builds the library's two bindings: the Python wheel (PyO3 + maturin, abi3 for CPython >= 3.9)
# into target/wheels/, and the C ABI library target/release/libmedsa_c.so (header:
# include/medsa.h). The default build includes the CUDA backend, like medsa-engine's: nvcc
# comes from scripts/setup-cuda.sh; the wheel still runs without CUDA or a GPU. maturin goes into
# .tools/maturin/ once (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cuda.sh
maturin_version=1.16.0
# maturin is one static binary: pip's --target install needs no virtual environment.
maturin=.tools/maturin/bin/maturin
if [ "$("$maturin" --version 2>/dev/null)" != "maturin $maturin_version" ]; then
  echo "installing maturin $maturin_version into .tools/maturin ..."
  rm -rf .tools/maturin
  python3 -m pip install --quiet --disable-pip-version-check --target .tools/maturin \
    "maturin==$maturin_version"
fi
# The wheels the tests and the benchmark install beside medsa's (once, into .tools/pywheels/).
if ! ls .tools/pywheels/numpy-*.whl .tools/pywheels/pytest-*.whl >/dev/null 2>&1; then
  echo "fetching numpy and pytest wheels into .tools/pywheels ..."
  python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    -d .tools/pywheels "numpy>=1.21,<3" "pytest>=7,<10"
fi
rm -f target/wheels/medsa-*.whl
"$maturin" build --quiet --release --strip -m bindings/python/Cargo.toml -o target/wheels
cargo build --quiet --release -p medsa-c
ls target/wheels/medsa-*.whl target/release/libmedsa_c.so
