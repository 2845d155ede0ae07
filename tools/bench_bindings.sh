#!/usr/bin/env bash
# The Python package's call overhead against the Rust API and the command line, in one run, on
# the tiny fixture model (tests/fixtures/tiny, its `box` inputs: one 96x96 image, one box):
#  - Rust API: criterion on medsa::runtime::Model::decode and embed+decode (benches/runtime.rs);
#  - Python: the same calls through the installed wheel (tools/bench_bindings.py), median per
#    call over rounds;
#  - CLI: `medsa-engine forward` on the same inputs (process start, model load, the run and the
#    output file), median over runs.
# Prints a markdown table for docs/PERF.md.   tools/bench_bindings.sh [rounds] [calls] [cli_runs]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
calls=${2:-2000}
cli_runs=${3:-20}
bash scripts/build-bindings.sh >/dev/null
cargo build --release --quiet --bin medsa-engine
rm -rf target/bench-py
python3 -m pip install --quiet --disable-pip-version-check --no-index --target target/bench-py \
  --find-links .tools/pywheels --find-links target/wheels medsa numpy
cargo bench --quiet --bench runtime -- --noplot >/dev/null 2>&1
py=$(PYTHONPATH=target/bench-py python3 tools/bench_bindings.py target/release/medsa-engine "$rounds" "$calls" "$cli_runs")
python3 - "$py" <<'PY'
import json, sys, platform, subprocess
py = json.loads(sys.argv[1])
def crit(name):
    e = json.load(open(f"target/criterion/runtime/{name}/new/estimates.json"))
    return e["median"]["point_estimate"] * 1e-9
rust_d, rust_f = crit("decode tiny box"), crit("embed+decode tiny box")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
us = lambda s: f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"
print(f"CPU: {cpu}, commit {commit}")
print("| call (tiny fixture, box) | Rust API | Python | Python - Rust | CLI `forward` |")
print("|---|---|---|---|---|")
print(f"| decode | {us(rust_d)} | {us(py['python_decode_s'])} | {us(py['python_decode_s'] - rust_d)} ({py['python_decode_s'] / rust_d:.2f}x) | - |")
print(f"| embed + decode | {us(rust_f)} | {us(py['python_embed_decode_s'])} | {us(py['python_embed_decode_s'] - rust_f)} ({py['python_embed_decode_s'] / rust_f:.2f}x) | {us(py['cli_forward_s'])} per process ({us(py['cli_start_s'])} to start and exit) |")
PY
