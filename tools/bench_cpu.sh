#!/usr/bin/env bash
# CPU benchmark: the vit_b image encoder at 1024x1024 (random weights), medsa vs the official
# PyTorch code in fp32, same thread count, measured in the same run and interleaved (torch,
# medsa, torch, medsa) so that machine noise hits both alike. Prints both medians and the ratio.
#   tools/bench_cpu.sh [repeats-per-round] [rounds]
# Needs the reference venv (.venv-ref, created here from tools/reference/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
rounds=${2:-2}
threads=$(nproc)
if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import torch, segment_anything" 2>/dev/null; then
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install -q -r tools/reference/requirements.txt
fi
cargo build --release --quiet
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  .venv-ref/bin/python tools/reference/bench_cpu.py --threads "$threads" --repeats "$reps" | tee -a "$out/torch.jsonl"
  RAYON_NUM_THREADS=$threads target/release/medsa-engine bench --variant vit_b --size 1024 --repeats "$reps" | tee -a "$out/medsa.jsonl"
done
python3 - "$out" "$threads" <<'PY'
import json, statistics, sys, subprocess
d, threads = sys.argv[1], sys.argv[2]
runs = lambda f: [r for l in open(f"{d}/{f}") for r in json.loads(l)["runs"]]
t, m = runs("torch.jsonl"), runs("medsa.jsonl")
mt, mm = statistics.median(t), statistics.median(m)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"vit_b encoder 1024x1024, batch 1, {threads} threads, commit {commit}")
print(f"  pytorch fp32 median {mt:.2f} s over {len(t)} runs")
print(f"  medsa   cpu  median {mm:.2f} s over {len(m)} runs")
print(f"  ratio medsa/pytorch {mm/mt:.3f}")
PY
