#!/usr/bin/env python3
"""Held-out contiguous blocks of the MNI152 example, and the prompts of three regimes, for
scripts/eval-propagation.sh.

Standard library only. scripts/prepare-mni152.py trains on slabs 0-2 of every period of 6
four-slice slabs and validates on slab 4; slabs 3 and 5 are used by neither. Slabs 3-5 of one
period are therefore 12 contiguous slices that training never saw (slab 3 touches a training
slab, slab 5 the next period's): the volumes propagation needs, where the validation volume's
slabs are 20 mm apart. Writes, for every period whose block holds grey matter,

    examples/data/mni152_blocks/images/block<p>.nii.gz, labels/block<p>.nii.gz
    examples/data/mni152_blocks/box3d.json   one 3D box per block: the grey matter's bounding
                                             box (as a user drawing around the structure)
    examples/data/mni152_blocks/box2d.json   one 2D box per block, on the middle slice of the
                                             grey matter's extent: its bounding box there

Box corners are voxel indices (x = i, y = j, z = k) in the block's own array order.
"""
import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("prep", os.path.join(HERE, "prepare-mni152.py"))
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

GM = 2


def bbox(lab, nx, ny, zs):
    x0 = y0 = 10**9
    x1 = y1 = -1
    for z in zs:
        base = z * nx * ny
        for j in range(ny):
            row = lab[base + j * nx:base + (j + 1) * nx]
            if GM not in row:
                continue
            i0 = row.index(GM)
            i1 = nx - 1 - row[::-1].index(GM)
            x0, x1, y0, y1 = min(x0, i0), max(x1, i1), min(y0, j), max(y1, j)
    return None if x1 < 0 else (x0, y0, x1, y1)


def main():
    root = prep.ROOT
    t1_h, (nx, ny, nz), t1 = prep.read_nifti(os.path.join(root, "mni152_t1.nii.gz"))
    _, _, labels = prep.read_nifti(os.path.join(root, "mni152_labels.nii.gz"))
    out = os.path.join(root, "mni152_blocks")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    plane = nx * ny
    period = prep.SLAB * prep.PERIOD
    box3d, box2d = [], []
    for p in range(nz // period):
        z0 = p * period + 3 * prep.SLAB
        zs = range(z0, z0 + 3 * prep.SLAB)
        if max(zs) >= nz:
            break
        lab = labels[z0 * plane:(zs[-1] + 1) * plane]
        img = t1[z0 * plane:(zs[-1] + 1) * plane]
        local = range(len(zs))
        with_gm = [z for z in local if GM in lab[z * plane:(z + 1) * plane]]
        if not with_gm:
            continue
        name = f"block{p}"
        shape = (nx, ny, len(zs))
        prep.write_nifti(os.path.join(out, "images", name + ".nii.gz"), t1_h, shape, img)
        prep.write_nifti(os.path.join(out, "labels", name + ".nii.gz"), t1_h, shape, lab)
        b = bbox(lab, nx, ny, with_gm)
        case = {"image": f"images/{name}.nii.gz", "output": f"{name}.nii.gz"}
        box3d.append(dict(case, box=[b[0], b[1], with_gm[0], b[2], b[3], with_gm[-1]]))
        zm = (with_gm[0] + with_gm[-1]) // 2
        b = bbox(lab, nx, ny, [zm])
        box2d.append(dict(case, box=[b[0], b[1], zm, b[2], b[3], zm]))
    for name, cases in (("box3d", box3d), ("box2d", box2d)):
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"cases": cases}, f, indent=1)
    print(f"{out}: {len(box3d)} blocks of {3 * prep.SLAB} slices")


if __name__ == "__main__":
    main()
