#!/usr/bin/env bash
# One fuzz campaign with the project's standard limits, at the lowest CPU priority (the
# machine is shared with normal builds), timed so the CPU seconds can be reported.
#   fuzz/campaign.sh <target> <seconds> [log file]
# New inputs go to fuzz/corpus/<target> (listed first, so libFuzzer writes there); the
# committed seeds in fuzz/seeds/<target> are read only.
set -euo pipefail
t=$1
secs=$2
log=${3:-fuzz/artifacts/$t-$(date -u +%Y%m%dT%H%M%S).log}
cd "$(dirname "$0")/.."
mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "$(dirname "$log")"
/usr/bin/time -f "TIME user=%U sys=%S wall=%e maxrss_kb=%M" \
    nice -n 19 cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || echo "EXIT $? (a finding, or a harness error)" >>"$log"
echo "$log"
