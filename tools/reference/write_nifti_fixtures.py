"""Write the NIfTI-1 fixtures for tests/nifti.rs with nibabel (the reference reader).

Usage (from the repository root):

    /work/main/.venv-ref/bin/python tools/reference/write_nifti_fixtures.py

Writes small volumes to tests/fixtures/nifti/ and `expected.safetensors` next to them. For each
fixture NAME (the file name without .nii/.nii.gz) the safetensors file holds:

- `NAME.data`   F32 [n]: float32(img.get_fdata()) flattened in file order (x fastest, order='F')
- `NAME.dims`   I64 [3]: (nx, ny, nz) with nz = 1 for 2-D files
- `NAME.affine` F64 [4, 4]: header.get_best_affine()
- `NAME.qform`  F64 [4, 4]: header.get_qform() (only where qform_code > 0)
- `NAME.sform`  F64 [4, 4]: header.get_sform() (only where sform_code > 0)
- `NAME.zooms`  F64 [3]: header.get_zooms()[:3]; for 2-D files z is |pixdim[3]| (1.0 if 0)
- `NAME.codes`  I64 [2]: (qform_code, sform_code)

Values follow a known formula of the voxel index v = i + nx*j + nx*ny*k so that a reader bug (wrong
order, wrong endianness, wrong scaling) shows as a wrong value, not as a lucky match.
"""

import os
import struct

import nibabel as nib
import numpy as np
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "nifti")
SHAPE = (7, 6, 5)


def index_volume(shape=SHAPE):
    """v[i, j, k] = i + nx*j + nx*ny*k (0 .. n-1), as float64."""
    n = int(np.prod(shape))
    return np.arange(n, dtype=np.float64).reshape(shape, order="F")


def oblique_affine(zooms, offset):
    """A rigid rotation (about a tilted axis) times anisotropic zooms, plus an offset."""
    ax = np.array([0.3, -0.5, 0.8])
    ax /= np.linalg.norm(ax)
    t = 0.4  # radians
    k = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    r = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = offset
    return a


def patch_scaling(path, slope, inter, endian="<"):
    """Set scl_slope/scl_inter (offsets 112/116) in an uncompressed .nii in place."""
    with open(path, "r+b") as f:
        f.seek(112)
        f.write(struct.pack(endian + "ff", slope, inter))


def main():
    os.makedirs(OUT, exist_ok=True)
    v = index_volume()
    c = v - 105.0  # centred: -105 .. 104, for signed types
    base_aff = np.diag([1.5, 1.5, 3.0, 1.0])
    base_aff[:3, 3] = [-4.0, 5.0, -6.5]

    files = {}

    def save(name, data, dtype, affine=base_aff, header=None, ext=".nii", after=None):
        img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine, header, dtype=dtype)
        img.header.set_xyzt_units("mm", "sec")
        path = os.path.join(OUT, name + ext)
        img.to_filename(path)
        if after is not None:
            after(path)
        files[name] = path

    # One per datatype nibabel and the Rust reader share (no complex/RGB).
    save("dtype_uint8", v, np.uint8)
    save("dtype_int8", c, np.int8)
    save("dtype_int16", c * 300, np.int16)
    save("dtype_uint16", v * 300, np.uint16)
    save("dtype_int32", c * 10_000_019, np.int32)
    save("dtype_uint32", v * 20_000_003, np.uint32)
    save("dtype_int64", c.astype(np.int64) * 1_000_000_000_007, np.int64)
    # Not exactly representable in f64: checks the u64 -> f64 -> f32 rounding path.
    save("dtype_uint64", v.astype(np.uint64) * np.uint64(10**16) + np.uint64(1), np.uint64)
    save("dtype_float32", c * 0.37, np.float32)
    save("dtype_float64", c * 1.23456789e-3, np.float64)

    # Scaled int16: slope 2, inter -3 patched into the header after writing (nibabel would
    # otherwise recompute or drop the scaling for integer data that needs none).
    save("scaled_int16", c, np.int16, after=lambda p: patch_scaling(p, 2.0, -3.0))

    # Big-endian int16 with its own scaling (the header floats are big-endian too).
    be = nib.Nifti1Header(endianness=">")
    save("bigendian_int16", c * 7, np.dtype(">i2"), header=be,
         after=lambda p: patch_scaling(p, 0.5, 10.0, ">"))

    # Gzipped float32.
    save("gzip_float32", c * -0.25, np.float32, ext=".nii.gz")

    # Oblique: anisotropic zooms, qform (code 1) and sform (code 2) both set to the same
    # rotated affine.
    zooms = (0.7, 1.3, 2.5)
    obl = oblique_affine(zooms, [12.5, -30.25, 41.0])
    hdr = nib.Nifti1Header()
    hdr.set_qform(obl, code=1)
    hdr.set_sform(obl, code=2)
    save("oblique_float32", c * 0.5, np.float32, affine=obl, header=hdr)
    # nibabel's Nifti1Image constructor re-sets qform/sform from `affine`: enforce the codes.
    img = nib.load(files["oblique_float32"])
    img.header.set_qform(obl, code=1)
    img.header.set_sform(obl, code=2)
    nib.Nifti1Image(img.get_fdata().astype(np.float32), obl, img.header).to_filename(
        files["oblique_float32"])

    # qform only (sform code 0), with qfac = -1 (a left-handed voxel grid).
    flip = oblique_affine((1.1, 0.9, 1.7), [-20.0, 15.5, 3.25]) @ np.diag([1, 1, -1, 1])
    img = nib.Nifti1Image(c.astype(np.int16), flip)
    img.header.set_qform(flip, code=1)
    img.header.set_sform(None, code=0)
    img.set_data_dtype(np.int16)
    path = os.path.join(OUT, "qform_only_int16.nii")
    img.to_filename(path)
    files["qform_only_int16"] = path

    # 2-D (dim[0] == 2).
    save("flat2d_uint8", v[:, :, 0] + 3, np.uint8)

    # 4-D with a singleton 4th dimension.
    save("single4d_int16", c.reshape(SHAPE + (1,), order="F") * -11, np.int16)

    tensors = {}
    for name, path in sorted(files.items()):
        img = nib.load(path)
        h = img.header
        data = img.get_fdata()
        shape = data.shape
        dims = list(shape[:3]) + [1] * (3 - min(3, len(shape)))
        assert int(np.prod(shape)) == int(np.prod(dims)), (name, shape)
        qf, qc = h.get_qform(coded=True)
        sf, sc = h.get_sform(coded=True)
        zooms = [float(z) for z in h.get_zooms()[:3]]
        # 2-D files: nibabel gives 2 zooms; the Rust reader reports |pixdim[3]| (1 if 0) for z.
        zooms += [abs(float(h["pixdim"][d + 1])) or 1.0 for d in range(len(zooms), 3)]
        tensors[name + ".data"] = data.flatten(order="F").astype(np.float32)
        tensors[name + ".dims"] = np.array(dims, dtype=np.int64)
        tensors[name + ".affine"] = np.asarray(h.get_best_affine(), dtype=np.float64)
        tensors[name + ".zooms"] = np.array(zooms, dtype=np.float64)
        tensors[name + ".codes"] = np.array([int(qc), int(sc)], dtype=np.int64)
        if int(qc) > 0:
            tensors[name + ".qform"] = np.asarray(qf, dtype=np.float64)
        if int(sc) > 0:
            tensors[name + ".sform"] = np.asarray(sf, dtype=np.float64)
        print(f"{name:18s} {os.path.getsize(path):6d} B  shape {shape}  "
              f"dtype {h.get_data_dtype()}  codes q{int(qc)} s{int(sc)}  "
              f"slope/inter {img.dataobj.slope}, {img.dataobj.inter}  zooms {zooms}")
    save_file(tensors, os.path.join(OUT, "expected.safetensors"),
              metadata={"generator": "tools/reference/write_nifti_fixtures.py",
                        "nibabel": nib.__version__})


if __name__ == "__main__":
    main()
