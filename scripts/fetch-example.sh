#!/usr/bin/env bash
# Fetches the bundled real example once: the MNI152 2009c T1 template and its grey/white matter
# maps, which ship inside the nilearn wheel on PyPI. They go to examples/data/ (ignored by git,
# never committed). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=examples/data
t1=$dest/mni152_t1.nii.gz
if [ -s "$t1" ] && [ -s "$dest/mni152_gm.nii.gz" ] && [ -s "$dest/mni152_wm.nii.gz" ]; then
  exit 0
fi
mkdir -p "$dest" .tools/nilearn
echo "fetching the MNI152 template from the nilearn wheel (PyPI) ..."
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  -d .tools/nilearn "nilearn==0.14.1"
whl=$(ls .tools/nilearn/nilearn-0.14.1-*.whl | head -1)
python3 - "$whl" "$dest" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
names = {
    "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": "mni152_t1.nii.gz",
    "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz": "mni152_gm.nii.gz",
    "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz": "mni152_wm.nii.gz",
}
with zipfile.ZipFile(whl) as z:
    for src, dst in names.items():
        tmp = os.path.join(dest, dst + ".tmp")
        with z.open(src) as f, open(tmp, "wb") as g:
            g.write(f.read())
        os.replace(tmp, os.path.join(dest, dst))
        print("  ", os.path.join(dest, dst))
PY
