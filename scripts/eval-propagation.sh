#!/usr/bin/env bash
# Three prompt regimes for volumes, with the bundled model (LiteMedSAM + the grey-matter
# adapter) on the held-out contiguous blocks of the MNI152 example (scripts/propagation-blocks.py
# says which): per-slice boxes from the label (the upper bound: the ground truth prompts every
# slice), one 3D box propagated, and one 2D box on the middle slice propagated. Prints 3D Dice,
# IoU and HD95 (mm; means over the blocks) and the time of each run; outputs in
# examples/out/propagation/. Needs what scripts/demo.sh fetches (it runs the same set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-example.sh
python3 scripts/prepare-mni152.py >/dev/null
python3 scripts/propagation-blocks.py
cargo build --release --no-default-features --quiet   # the CPU is enough here
bin=target/release/medsa-engine
bash scripts/fetch-litemedsam.sh "$bin"
base=.models/lite_medsam.safetensors
adapter=examples/models/litemedsam_gm_adapter.safetensors
blocks=examples/data/mni152_blocks
out=examples/out/propagation
rm -rf "$out"
mkdir -p "$out"
common=(--checkpoint "$base" --adapter "$adapter" --labels "$blocks/labels" --quiet)
regime() { # name, then segment arguments
  local name=$1
  shift
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" segment "${common[@]}" -o "$out/$name" "$@" 2>"$out/$name.log" || {
    cat "$out/$name.log" >&2
    exit 1
  }
  t1=$(date +%s.%N)
  local mean
  mean=$(tail -n 1 "$out/$name/metrics.csv")
  echo "$name,$mean,$(python3 -c "print(f'{$t1 - $t0:.1f}')")" >>"$out/table.csv"
  grep -h "^segment:" "$out/$name.log" || true
}
echo "regime,_,dice,iou,hd95,seconds" >"$out/table.csv"
regime per-slice-boxes -i "$blocks/images" --prompt-from-label "$blocks/labels"
regime box3d-propagated -i "$blocks/box3d.json" --propagate
regime box2d-propagated -i "$blocks/box2d.json" --propagate
column -s, -t "$out/table.csv"
