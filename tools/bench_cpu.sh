#!/usr/bin/env bash
# CPU benchmark, medsa against the official PyTorch code, same threads, in one run, interleaved
# by round (torch fp32, torch bf16 autocast, medsa f32, medsa bf16, then again) so that machine
# noise hits all four alike:
#  - the vit_b image encoder at 1024x1024 (random weights; tools/reference/bench_cpu.py);
#  - the LiteMedSAM (TinyViT-5M) encoder at 256x256 (the real weights;
#    tools/reference/bench_tinyvit.py), when .models/lite_medsam.safetensors exists.
# Prints a markdown table (seconds per batch, medians over all runs) for docs/PERF.md with the
# CPU model and its bf16 flags.
#   tools/bench_cpu.sh [repeats-per-round] [rounds] [batches, e.g. "1 8"]
# Needs the reference venv (.venv-ref, created here from tools/reference/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
rounds=${2:-2}
batches=${3:-1}
threads=$(nproc)
if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import torch, segment_anything" 2>/dev/null; then
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install -q -r tools/reference/requirements.txt
fi
cargo build --release --quiet --no-default-features --bin medsa-engine
bin=target/release/medsa-engine
out=$(mktemp -d)
lite=.models/lite_medsam.safetensors
for b in $batches; do
  for r in $(seq "$rounds"); do
    for p in fp32 bf16; do
      .venv-ref/bin/python tools/reference/bench_cpu.py --threads "$threads" --repeats "$reps" \
        --batch "$b" --precision "$p" | sed "s/^/vit_b torch_$p $b /" >>"$out/runs.txt"
    done
    for p in f32 bf16; do
      RAYON_NUM_THREADS=$threads "$bin" bench --variant vit_b --size 1024 --batch "$b" \
        --repeats "$reps" --precision "$p" 2>/dev/null | tail -1 | sed "s/^/vit_b medsa_$p $b /" >>"$out/runs.txt"
    done
    if [ -s "$lite" ]; then
      .venv-ref/bin/python tools/reference/bench_tinyvit.py --threads "$threads" --repeats "$reps" \
        --batches "$b" --engines pytorch pytorch_bf16 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    r = json.loads(l); e = {"pytorch": "torch_fp32", "pytorch_bf16": "torch_bf16"}[r["engine"]]
    print("litemedsam", e, r["batch"], l.strip())' >>"$out/runs.txt"
      for p in f32 bf16; do
        RAYON_NUM_THREADS=$threads "$bin" bench --checkpoint "$lite" --size 256 --batch "$b" \
          --repeats "$reps" --precision "$p" 2>/dev/null | tail -1 | sed "s/^/litemedsam medsa_$p $b /" >>"$out/runs.txt"
      done
    fi
  done
done
python3 - "$out/runs.txt" "$threads" <<'PY'
import json, statistics, subprocess, sys
runs = {}
for line in open(sys.argv[1]):
    model, impl, batch, js = line.split(" ", 3)
    runs.setdefault((model, int(batch)), {}).setdefault(impl, []).extend(json.loads(js)["runs"])
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
flags = next(l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags"))
bf = [f for f in flags if "bf16" in f or f.startswith("amx")]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"CPU: {cpu}, {sys.argv[2]} threads, bf16 flags: {' '.join(bf) or 'none'}, commit {commit}")
print("| model | batch | PyTorch fp32 | PyTorch bf16 autocast | medsa f32 | medsa bf16 | medsa bf16 / PyTorch bf16 | medsa bf16 / medsa f32 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (model, batch), r in sorted(runs.items()):
    m = {k: statistics.median(v) for k, v in r.items()}
    cell = lambda k: f"{m[k]:.3f} s" if k in m else "-"
    ratio = lambda a, b: f"{m[a] / m[b]:.2f}" if a in m and b in m else "-"
    print(f"| {model} | {batch} | {cell('torch_fp32')} | {cell('torch_bf16')} | {cell('medsa_f32')} | {cell('medsa_bf16')} | {ratio('medsa_bf16', 'torch_bf16')} | {ratio('medsa_bf16', 'medsa_f32')} |")
PY
