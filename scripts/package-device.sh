#!/usr/bin/env bash
# Builds what the GPU machine needs and puts it under .device/ (ignored by git), for
# scripts/gpu-check.sh to run there (no Rust toolchain, no network on that machine).
#
#   scripts/package-device.sh
#
# Produces:
#   .device/bin/medsa-engine          release binary (--features cuda), stripped
#   .device/bin/<test target>         every test executable of `cargo test --release --features cuda`,
#                                     stripped; integration tests keep their target name
#                                     (tests/cuda_parity.rs -> cuda_parity), unit-test executables
#                                     of the lib and bins get a "unit-" prefix (unit-medsa,
#                                     unit-medsa-engine) so that nothing overwrites medsa-engine
#   .device/whl/segment_anything-1.0-py3-none-any.whl
#   .device/build-root                the absolute repo path the tests were compiled in (they embed
#                                     it through env!("CARGO_MANIFEST_DIR"); gpu-check.sh uses it)
#   .device/MANIFEST                  commit, date, files and sizes
# If .device plus the work tree would exceed the 64 MiB that travel (or PACK_XZ=1), bin/ is
# replaced by .device/bin.tar.xz, which gpu-check.sh unpacks there.
#
# Then, from the tool side: carry [".device"], command "scripts/gpu-check.sh".
# Idempotent: .device/bin is rebuilt every time; the wheel is downloaded once.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dev=.device
limit_mib=64

say() { printf '== %s\n' "$*"; }
die() { printf 'package-device: error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found"
command -v strip >/dev/null || die "strip not found (binutils)"
if git check-ignore -q "$dev/x" 2>/dev/null; then :; else
  echo "package-device: warning: $dev/ is not ignored by git; add '/$dev' to .gitignore or .git/info/exclude" >&2
fi

# nvcc for kernels/*.cu (build.rs looks in NVCC, CUDA_HOME/CUDA_PATH, .tools/cuda-pkgs, PATH)
if [ -z "${NVCC:-}${CUDA_HOME:-}${CUDA_PATH:-}" ] && ! command -v nvcc >/dev/null && [ -x scripts/setup-cuda.sh ]; then
  say "nvcc: scripts/setup-cuda.sh"
  scripts/setup-cuda.sh
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say "cargo build --release --features cuda"
cargo build --release --features cuda
[ -x target/release/medsa-engine ] || die "target/release/medsa-engine was not built"

say "cargo test --release --features cuda --no-run"
# json-render-diagnostics: the JSON artifacts on stdout, warnings and errors readable on stderr
cargo test --release --features cuda --no-run --message-format=json-render-diagnostics >"$tmp/cargo.json"

# one line per test executable: "<name>\t<path>"
python3 - "$tmp/cargo.json" >"$tmp/tests.tsv" <<'EOF'
import json, sys
seen = {}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not (m.get("profile") or {}).get("test"):
        continue
    t = m["target"]
    name = t["name"]
    if "test" not in t.get("kind", []):      # unit tests of a lib / bin / bench target
        name = "unit-" + name
    if name in seen and seen[name] != m["executable"]:
        sys.exit(f"two test executables named {name}: {seen[name]} and {m['executable']}")
    seen[name] = m["executable"]
for name, exe in sorted(seen.items()):
    print(f"{name}\t{exe}")
EOF
[ -s "$tmp/tests.tsv" ] || die "cargo reported no test executables"

say "copying into $dev/bin"
rm -rf "$dev/bin" "$dev/bin.tar.xz"
mkdir -p "$dev/bin"
cp target/release/medsa-engine "$dev/bin/medsa-engine"
while IFS=$'\t' read -r name exe; do
  [ "$name" = medsa-engine ] && die "a test executable is named medsa-engine"
  cp "$exe" "$dev/bin/$name"
  echo "  $name <- ${exe#"$root"/}"
done <"$tmp/tests.tsv"
strip "$dev"/bin/*
chmod +x "$dev"/bin/*
printf '%s\n' "$root" >"$dev/build-root"

say "segment-anything wheel in $dev/whl"
mkdir -p "$dev/whl"
if ls "$dev"/whl/segment_anything-1.0-*.whl >/dev/null 2>&1; then
  echo "  already there: $(basename "$dev"/whl/segment_anything-1.0-*.whl)"
else
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$dev/whl" "segment-anything==1.0"; then
    echo "  no wheel on the index: building one from the sdist"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
      -d "$tmp/sdist" "segment-anything==1.0"
    python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$dev/whl" "$tmp"/sdist/*
  fi
  ls "$dev"/whl/segment_anything-1.0-*.whl >/dev/null 2>&1 || die "no segment_anything wheel in $dev/whl"
fi
n_whl=$(find "$dev/whl" -name '*.whl' | wc -l)
[ "$n_whl" -eq 1 ] || echo "package-device: warning: $n_whl wheels in $dev/whl (gpu-check installs all of them)" >&2

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "build-root: $root"
  (cd "$dev" && find bin whl -type f -printf '%s\t%p\n' | sort -k2)
} >"$dev/MANIFEST"

say "sizes"
(cd "$dev" && du -h bin/* whl/* | sort -k2)
dev_kib=$(du -sk "$dev" | cut -f1)
# the rest of what travels: tracked files + untracked files that git does not ignore
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mib=$(((dev_kib + tree_kib + 1023) / 1024))
echo "  $dev: $(((dev_kib + 1023) / 1024)) MiB; work tree: $(((tree_kib + 1023) / 1024)) MiB; total that travels: $total_mib MiB (limit $limit_mib MiB)"
if [ "$total_mib" -ge "$limit_mib" ] || [ "${PACK_XZ:-0}" = 1 ]; then
  # xz typically shrinks the stripped executables 3x; gpu-check.sh unpacks bin.tar.xz there
  say "packing $dev/bin into $dev/bin.tar.xz"
  command -v xz >/dev/null || die "xz not found"
  tar -C "$dev" -cf - bin | xz -9 -T0 >"$dev/bin.tar.xz"
  rm -rf "$dev/bin"
  dev_kib=$(du -sk "$dev" | cut -f1)
  total_mib=$(((dev_kib + tree_kib + 1023) / 1024))
  echo "  $dev: $(((dev_kib + 1023) / 1024)) MiB; total that travels: $total_mib MiB (limit $limit_mib MiB)"
  if [ "$total_mib" -ge "$limit_mib" ]; then
    die "still over the $limit_mib MiB limit: drop test executables that need no GPU, or shrink the fixtures"
  fi
fi
say "done: carry [\".device\"] and run scripts/gpu-check.sh"
