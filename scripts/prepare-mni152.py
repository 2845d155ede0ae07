#!/usr/bin/env python3
"""Cuts the MNI152 example into a training and a validation volume for `medsa-engine train`.

Standard library only. Reads examples/data/mni152_{t1,gm,wm}.nii.gz (fetched by
scripts/fetch-example.sh) and writes

    examples/data/mni152_train/{images,labels}/mni152.nii.gz
    examples/data/mni152_val/{images,labels}/mni152.nii.gz
    examples/data/mni152_labels.nii.gz   (the labels of the whole, uncut volume)

Labels: 1 = white matter (WM map >= 50%), 2 = grey matter (GM map >= 50%), 0 otherwise.
Split along the third (axial) axis in slabs of 4 slices, in a period of 6 slabs: slabs 0-2 go
to training, slab 4 to validation, slabs 3 and 5 are dropped, so every validation slice is at
least 5 slices (5 mm) away from any training slice. The header is copied unchanged
except for the number of slices. Idempotent: outputs made with the same split are kept.
"""
import gzip
import os
import struct
import sys

SLAB = 4
PERIOD = 6
TRAIN = (0, 1, 2)
VAL = (4,)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data")


def read_nifti(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if struct.unpack("<i", raw[:4])[0] != 348:
        sys.exit(f"{path}: not a little-endian NIfTI-1 file")
    dim = struct.unpack("<8h", raw[40:56])
    datatype = struct.unpack("<h", raw[70:72])[0]
    if datatype != 2:
        sys.exit(f"{path}: datatype {datatype}, expected 2 (uint8)")
    vox_offset = int(struct.unpack("<f", raw[108:112])[0])
    nx, ny, nz = dim[1], dim[2], dim[3]
    data = raw[vox_offset:vox_offset + nx * ny * nz]
    return raw[:vox_offset], (nx, ny, nz), data


def write_nifti(path, header, shape, data):
    nx, ny, nz = shape
    h = bytearray(header)
    h[46:48] = struct.pack("<h", nz)
    tmp = path + ".tmp"
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(bytes(h))
        f.write(data)
    os.replace(tmp, path)


def main():
    t1_h, shape, t1 = read_nifti(os.path.join(ROOT, "mni152_t1.nii.gz"))
    _, s_gm, gm = read_nifti(os.path.join(ROOT, "mni152_gm.nii.gz"))
    _, s_wm, wm = read_nifti(os.path.join(ROOT, "mni152_wm.nii.gz"))
    if not (shape == s_gm == s_wm):
        sys.exit(f"grids differ: {shape} {s_gm} {s_wm}")
    nx, ny, nz = shape
    plane = nx * ny
    labels = bytes(1 if w >= 128 else (2 if g >= 128 else 0) for w, g in zip(wm, gm))
    full = os.path.join(ROOT, "mni152_labels.nii.gz")
    if not os.path.exists(full):
        write_nifti(full, t1_h, shape, labels)
        print(f"{full}: labels of the whole {nx}x{ny}x{nz} volume")
    parts = {"mni152_train": TRAIN, "mni152_val": VAL}
    for name, slabs in parts.items():
        out = os.path.join(ROOT, name)
        img_p = os.path.join(out, "images", "mni152.nii.gz")
        lab_p = os.path.join(out, "labels", "mni152.nii.gz")
        marker = os.path.join(out, "split.txt")
        spec = f"slab {SLAB}, period {PERIOD}, slabs {list(slabs)}\n"
        if os.path.exists(img_p) and os.path.exists(lab_p) and os.path.exists(marker):
            with open(marker) as f:
                if f.read() == spec:
                    continue
        zs = [z for z in range(nz) if (z // SLAB) % PERIOD in slabs]
        img = b"".join(t1[z * plane:(z + 1) * plane] for z in zs)
        lab = b"".join(labels[z * plane:(z + 1) * plane] for z in zs)
        os.makedirs(os.path.dirname(img_p), exist_ok=True)
        os.makedirs(os.path.dirname(lab_p), exist_ok=True)
        write_nifti(img_p, t1_h, (nx, ny, len(zs)), img)
        write_nifti(lab_p, t1_h, (nx, ny, len(zs)), lab)
        with open(marker, "w") as f:
            f.write(spec)
        wm_n = sum(1 for v in lab if v == 1)
        gm_n = sum(1 for v in lab if v == 2)
        print(f"{out}: {len(zs)} slices, {wm_n} WM and {gm_n} GM voxels")


if __name__ == "__main__":
    main()
