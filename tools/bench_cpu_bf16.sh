#!/usr/bin/env bash
# CPU bf16 benchmark: medsa's bf16 products (AVX512-BF16, or the portable kernel) against its
# f32 path, in the same run, interleaved by round so that machine noise hits both alike:
# the vit_b encoder at 1024 and the LiteMedSAM (TinyViT) encoder at 256, batch 1 and 8, with
# each run's peak resident memory; then the product rates (criterion, benches/cpu_bf16.rs).
# Prints a markdown table for docs/PERF.md with the CPU model and its bf16-relevant flags.
#   tools/bench_cpu_bf16.sh [repeats] [rounds]
# CPU only: builds without the cuda feature (no nvcc needed). The LiteMedSAM rows need
# .models/lite_medsam.safetensors (scripts/fetch-litemedsam.sh); without it they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
rounds=${2:-2}
threads=$(nproc)
cargo build --release --quiet --no-default-features --bin medsa-engine
bin=target/release/medsa-engine
out=$(mktemp -d)
run() { # name batch repeats args...
  local name=$1 batch=$2 r=$3
  shift 3
  for p in f32 bf16; do
    /usr/bin/time -f "%M" -o "$out/rss" env RAYON_NUM_THREADS="$threads" "$bin" bench "$@" \
      --batch "$batch" --repeats "$r" --precision "$p" 2>/dev/null | tail -1 >"$out/one.json"
    python3 - "$out" "$name" "$batch" "$p" <<'PY'
import json, sys
d, name, batch, p = sys.argv[1:]
r = json.load(open(f"{d}/one.json"))
r.update(name=name, batch=int(batch), precision=p, rss_kb=int(open(f"{d}/rss").read().split()[-1]))
open(f"{d}/all.jsonl", "a").write(json.dumps(r) + "\n")
print(f"{name} batch {batch} {p}: median {r['median_s']:.3f} s, peak RSS {r['rss_kb'] / 1024:.0f} MiB")
PY
  done
}
for _ in $(seq "$rounds"); do
  run "vit_b 1024" 1 "$reps" --variant vit_b --size 1024
  if [ -f .models/lite_medsam.safetensors ]; then
    for b in 1 8; do
      run "LiteMedSAM 256" "$b" "$reps" --checkpoint .models/lite_medsam.safetensors --size 256
    done
  fi
done
# vit_b at batch 8 takes most of a minute per pass on two cores: one round, two repeats.
run "vit_b 1024" 8 2 --variant vit_b --size 1024 --warmup 0
cargo bench --quiet --no-default-features --bench cpu_bf16 >"$out/products.txt" 2>/dev/null || true
python3 - "$out" "$threads" <<'PY'
import json, statistics, sys, subprocess, collections, re
d, threads = sys.argv[1], sys.argv[2]
runs, rss = collections.defaultdict(list), collections.defaultdict(list)
for l in open(f"{d}/all.jsonl"):
    r = json.loads(l)
    runs[(r["name"], r["batch"], r["precision"])] += r["runs"]
    rss[(r["name"], r["batch"], r["precision"])].append(r["rss_kb"])
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
seen = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16") if f in flags]
print(f"\nCPU: {cpu}, {threads} threads; flags: {' '.join(seen)}; commit {commit}\n")
print("| encoder | batch | medsa f32 median s | medsa bf16 median s | f32 / bf16 | peak RSS f32 / bf16 MiB |")
print("|---|---:|---:|---:|---:|---:|")
for (name, batch) in sorted({(k[0], k[1]) for k in runs}):
    f, b = runs[(name, batch, "f32")], runs[(name, batch, "bf16")]
    if not f or not b:
        continue
    mf, mb = statistics.median(f), statistics.median(b)
    rf, rb = max(rss[(name, batch, "f32")]) / 1024, max(rss[(name, batch, "bf16")]) / 1024
    print(f"| {name} | {batch} | {mf:.3f} ({len(f)} runs) | {mb:.3f} ({len(b)} runs) | {mf / mb:.2f}x | {rf:.0f} / {rb:.0f} |")
print("\n| product | f32 GFLOP/s | bf16 GFLOP/s | bf16 / f32 |")
print("|---|---:|---:|---:|")
rates, name = {}, None
for l in open(f"{d}/products.txt"):
    m = re.match(r"products/(.*) (f32|bf16)\s*$", l)
    if m:
        name = m.groups()
    # The first rate after a benchmark's name: [low median high] in Gelem/s (FLOP/s here).
    m = re.search(r"thrpt:\s+\[\S+ \S+ (\S+) Gelem/s", l)
    if m and name:
        rates.setdefault(name[0], {})[name[1]] = float(m.group(1))
        name = None
for name, r in rates.items():
    if "f32" in r and "bf16" in r:
        print(f"| {name} | {r['f32']:.0f} | {r['bf16']:.0f} | {r['bf16'] / r['f32']:.2f}x |")
PY
