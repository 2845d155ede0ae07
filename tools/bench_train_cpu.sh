#!/usr/bin/env bash
# CPU training benchmark, small shapes: vit_b with Med-SA encoder + decoder adapters, random
# weights, `adapters+decoder` trained, one click per image, BCE (pos_weight 2) on the low-res
# masks, Adam(W) lr 1e-4. medsa (`medsa-engine bench --train`) vs the PyTorch reference
# (tools/reference/bench_train.py, fp32 as the official code runs), same thread count, measured
# in the same run and interleaved (torch, medsa, torch, medsa, ...) so that machine noise hits
# both alike. Each PyTorch configuration runs in a fresh process (peak RSS per configuration);
# each medsa one is a fresh process too. Prints a markdown table of medians (all timed steps of
# all rounds pooled), the ratio medsa / torch, and the peak RSS of each side.
#   tools/bench_train_cpu.sh [timed-steps-per-round] [rounds] [size] [batches...]
#   defaults: 2 3 256 2 1
# Needs the reference venv (.venv-ref, created here from tools/reference/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-2}
rounds=${2:-3}
size=${3:-256}
shift $(($# < 3 ? $# : 3))
batches=("$@")
[ ${#batches[@]} -gt 0 ] || batches=(2 1)
threads=$(nproc)
warmup=1
if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import torch, segment_anything" 2>/dev/null; then
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install -q -r tools/reference/requirements.txt
fi
cargo build --release --quiet --bin medsa-engine
out=$(mktemp -d)
echo "load before: $(uptime)" | tee "$out/load.txt"
for r in $(seq "$rounds"); do
  for b in "${batches[@]}"; do
    echo "== round $r/$rounds, batch $b" >&2
    .venv-ref/bin/python tools/reference/bench_train.py --device cpu --size "$size" --batch "$b" \
      --modes fp32 --warmup "$warmup" --repeats "$reps" --threads "$threads" --json "$out/t.json" >&2
    .venv-ref/bin/python -c 'import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))["results"]]' \
      "$out/t.json" >>"$out/torch.jsonl"
    RAYON_NUM_THREADS=$threads target/release/medsa-engine bench --train --variant vit_b --size "$size" \
      --batch "$b" --warmup "$warmup" --repeats "$reps" | tee -a "$out/medsa.jsonl" >&2
  done
done
echo "load after:  $(uptime)" | tee -a "$out/load.txt"
python3 - "$out" "$threads" "$size" "$reps" "$rounds" "${batches[@]}" <<'PY'
import json, statistics, sys, subprocess
d, threads, size, reps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
batches = [int(b) for b in sys.argv[6:]]
def load(f):
    return [json.loads(l) for l in open(f"{d}/{f}") if l.strip()]
torch, medsa = load("torch.jsonl"), load("medsa.jsonl")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
print(f"\nvit_b train step {size}x{size}, adapters+decoder, {threads} threads, commit {commit}"
      f"{' (+ uncommitted changes)' if dirty else ''}; {rounds} interleaved rounds x {reps} timed steps "
      "(after 1 warm-up step) per side and batch")
print("\n| impl | batch | step s (median) | step s (min) | images/s (median) | peak RSS MiB | steps |")
print("|---|---:|---:|---:|---:|---:|---:|")
ratios = []
for b in batches:
    t = [r for r in torch if r.get("batch") == b and "error" not in r]
    m = [r for r in medsa if r.get("batch") == b]
    bad = [r["error"] for r in torch if r.get("batch") == b and "error" in r]
    if bad:
        print(f"| pytorch fp32 | {b} | error: {bad[0][:60]} | | | | |")
    row = {}
    for name, rs, key, scale in (("pytorch fp32", t, "runs_ms", 1e-3), ("medsa cpu", m, "runs", 1.0)):
        runs = [x * scale for r in rs for x in r[key]]
        if not runs:
            continue
        med = statistics.median(runs)
        peak = statistics.median(r["peak_bytes"] for r in rs) / 2**20
        row[name] = (med, peak)
        print(f"| {name} | {b} | {med:.2f} | {min(runs):.2f} | {b / med:.3f} | {peak:.0f} | {len(runs)} |")
    if len(row) == 2:
        ratios.append((b, row["medsa cpu"][0] / row["pytorch fp32"][0], row["medsa cpu"][1] / row["pytorch fp32"][1]))
print()
for b, rt, rm in ratios:
    print(f"batch {b}: step time medsa / pytorch **{rt:.3f}** ({1 / rt:.2f}x the images/s); "
          f"peak RSS medsa / pytorch {rm:.3f}  ")
fb = [r["fb_median_s"] / r["median_s"] for r in medsa if r.get("median_s")]
if fb:
    print(f"medsa step split: forward+loss+backward {100 * statistics.median(fb):.0f}% of the step, optimiser the rest")
rss0 = [r.get("rss_after_import_bytes") for r in torch if r.get("rss_after_import_bytes")]
if rss0:
    print(f"pytorch RSS after `import torch` (before the model): {statistics.median(rss0) / 2**20:.0f} MiB")
PY
cat "$out/load.txt"
rm -rf "$out"
