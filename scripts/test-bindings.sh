#!/usr/bin/env bash
# Tests the Python package and the C ABI as a user gets them (scripts/test.sh runs this after
# cargo test, whose medsa-engine binary the Python suite compares against):
#  1. builds the wheel and libmedsa_c.so (scripts/build-bindings.sh);
#  2. compiles tests/c/test_medsa.c with cc against include/medsa.h and runs it on a fixture;
#  3. installs the wheel into a fresh virtual environment (.venv-wheel/, remade every run; numpy
#     and pytest from a wheel cache in .tools/pywheels/, fetched once) and runs the pytest suite
#     and the README's Python example there, with no Rust toolchain on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/build-bindings.sh

echo "== C ABI test (cc against include/medsa.h)"
work=target/bindings-test
rm -rf "$work"
mkdir -p "$work"
rm -rf .venv-wheel
clean_env=(env -i "HOME=$HOME" "PATH=$root/.venv-wheel/bin:/usr/bin:/bin" "LANG=C.UTF-8")
if python3 -m venv .venv-wheel >/dev/null 2>&1 && [ -x .venv-wheel/bin/pip ]; then
  .venv-wheel/bin/pip install --quiet --disable-pip-version-check --no-index \
    --find-links .tools/pywheels --find-links target/wheels medsa numpy pytest
  pyw=("$root/.venv-wheel/bin/python")
else
  # Debian's python3 without python3-venv: the same clean install, into a folder of its own.
  echo "note: python3 cannot make a virtual environment (Debian: python3-venv); installing into .venv-wheel/site instead"
  rm -rf .venv-wheel
  python3 -m pip install --quiet --disable-pip-version-check --no-index --target .venv-wheel/site \
    --find-links .tools/pywheels --find-links target/wheels medsa numpy pytest
  pyw=("$(python3 -c 'import sys; print(sys.executable)')")
  clean_env+=("PYTHONPATH=$root/.venv-wheel/site" "PYTHONNOUSERSITE=1")
fi
if "${clean_env[@]}" sh -c 'command -v cargo || command -v rustc' >/dev/null; then
  echo "error: the clean environment still finds a Rust toolchain" >&2
  exit 1
fi
"${clean_env[@]}" "${pyw[@]}" tests/python/conftest.py tiny points "$work/fixture"
cc -std=c99 -Wall -Wextra -Werror -O1 -Iinclude tests/c/test_medsa.c -o "$work/test_medsa" \
  -Ltarget/release -lmedsa_c -lm "-Wl,-rpath,$root/target/release"
"$work/test_medsa" tests/fixtures/tiny/weights.safetensors "$work/fixture"
# The README's examples are these files, verbatim (so what users copy is what is tested).
python3 - <<'PY'
import sys
readme = open("README.md").read()
for path in ["examples/python/segment_volume.py", "examples/c/segment_volume.c"]:
    body = "\n".join(l for l in open(path).read().splitlines()
                     if not (l.startswith("# ") or l.startswith("/* The README")))
    if body.strip() not in readme:
        sys.exit(f"README.md does not quote {path} verbatim")
PY
cc -std=c99 -Wall -Wextra -Werror -Iinclude -c examples/c/segment_volume.c -o "$work/example.o"

echo "== Python package: pytest in a fresh venv with only the wheel, numpy and pytest"
# The LiteMedSAM test needs the converted checkpoint (once, with the test build's binary).
if [ -s .models/lite_medsam.pth ]; then
  bash scripts/fetch-litemedsam.sh target/debug/medsa-engine
fi
# cargo test built the CPU emulator of the CUDA kernels (when a C++ compiler was there): the
# package's CUDA path runs on it.
kemu=$(ls -t target/tmp/libkemu-*.so 2>/dev/null | head -1 || true)
"${clean_env[@]}" MEDSA_ROOT="$root" MEDSA_WHEEL_TEST=1 MEDSA_TEST_KEMU="${kemu:+$root/$kemu}" \
  MEDSA_ENGINE="$root/target/debug/medsa-engine" MEDSA_ENGINE_REQUIRED=1 \
  MEDSA_LITEMEDSAM="${MEDSA_LITEMEDSAM:-}" MEDSA_EXAMPLE_DATA="${MEDSA_EXAMPLE_DATA:-}" \
  "${pyw[@]}" -m pytest -q -p no:cacheprovider tests/python

echo "== the README's Python example, in the same environment"
if [ -s .models/lite_medsam.safetensors ] && [ -d examples/data/mni152_val ]; then
  "${clean_env[@]}" "${pyw[@]}" examples/python/segment_volume.py
elif [ "${MEDSA_EXAMPLE_DATA:-}" = 1 ]; then
  echo "error: MEDSA_EXAMPLE_DATA=1 but the example's model or volume is missing" >&2
  exit 1
else
  echo "skipped: the LiteMedSAM checkpoint or the MNI152 example is absent"
fi
