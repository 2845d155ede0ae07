#!/usr/bin/env bash
# CPU benchmark of the real LiteMedSAM image encoder (TinyViT-5M, 256x256): medsa against
# PyTorch eager, ONNX Runtime and OpenVINO (tools/reference/bench_tinyvit.py exports the ONNX
# graph itself), all with the same thread count, in the same run, interleaved by round so that
# machine noise hits every engine alike. Prints each engine's median per batch size and the ratio
# medsa / fastest baseline.
#   tools/bench_tinyvit_cpu.sh [repeats-per-round] [rounds]
# Needs the reference venv (.venv-ref from tools/reference/requirements.txt) and the checkpoint
# (scripts/fetch-litemedsam.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
rounds=${2:-2}
threads=$(nproc)
cargo build --release --quiet --bin medsa-engine
bin=target/release/medsa-engine
bash scripts/fetch-litemedsam.sh "$bin"
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  for b in 1 8; do
    .venv-ref/bin/python tools/reference/bench_tinyvit.py --threads "$threads" --repeats "$reps" \
      --batches "$b" 2>/dev/null | tee -a "$out/base.jsonl"
    RAYON_NUM_THREADS=$threads "$bin" bench --checkpoint .models/lite_medsam.safetensors \
      --size 256 --batch "$b" --repeats "$reps" | tee -a "$out/medsa.jsonl"
  done
done
python3 - "$out" "$threads" <<'PY'
import json, statistics, sys, subprocess, collections
d, threads = sys.argv[1], sys.argv[2]
runs = collections.defaultdict(list)
for f, key in (("base.jsonl", "engine"), ("medsa.jsonl", None)):
    for line in open(f"{d}/{f}"):
        r = json.loads(line)
        name = r[key] if key else "medsa"
        runs[(name, r["batch"])] += r.get("runs", [r["median_s"]])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"LiteMedSAM image encoder 256x256, {threads} threads, commit {commit} (seconds per batch, medians)")
for b in sorted({b for _, b in runs}):
    med = {e: statistics.median(v) for (e, bb), v in runs.items() if bb == b}
    base = {e: m for e, m in med.items() if e != "medsa"}
    fastest = min(base, key=base.get)
    cells = ", ".join(f"{e} {m:.3f} s ({len(runs[(e, b)])} runs)" for e, m in sorted(med.items()))
    print(f"  batch {b}: {cells}")
    print(f"  batch {b}: medsa / {fastest} = {med['medsa'] / base[fastest]:.3f}, medsa / pytorch = {med['medsa'] / med['pytorch']:.3f}")
PY
