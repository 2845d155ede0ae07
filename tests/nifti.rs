//! NIfTI-1 reading and writing against nibabel
//! (`tools/reference/write_nifti_fixtures.py` wrote `tests/fixtures/nifti/`).
//!
//! Values must match exactly (`f32` of nibabel's `get_fdata()`), dims exactly, spacing and affines
//! to 1e-6 (nibabel builds the qform rotation in float32).

use std::path::{Path, PathBuf};

use medsa::data::nifti::{read_nifti, volume_slices, write_f32, write_labels, NiftiHeader};
use medsa::Error;
use safetensors::{Dtype, SafeTensors};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti")
}

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nifti-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn load() -> Self {
        let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
        Expected { bytes }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .st()
            .names()
            .iter()
            .filter_map(|k| k.strip_suffix(".data").map(str::to_string))
            .collect();
        v.sort();
        v
    }
    fn raw(&self, key: &str, dtype: Dtype) -> Option<Vec<[u8; 8]>> {
        let st = self.st();
        let t = st.tensor(key).ok()?;
        assert_eq!(t.dtype(), dtype, "{key}");
        let w = dtype.bitsize() / 8;
        Some(
            t.data()
                .chunks_exact(w)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a[..w].copy_from_slice(c);
                    a
                })
                .collect(),
        )
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        let r = self.raw(key, Dtype::F32).unwrap();
        r.iter()
            .map(|a| f32::from_le_bytes([a[0], a[1], a[2], a[3]]))
            .collect()
    }
    fn f64s(&self, key: &str) -> Option<Vec<f64>> {
        Some(
            self.raw(key, Dtype::F64)?
                .iter()
                .map(|a| f64::from_le_bytes(*a))
                .collect(),
        )
    }
    fn i64s(&self, key: &str) -> Vec<i64> {
        let r = self.raw(key, Dtype::I64).unwrap();
        r.iter().map(|a| i64::from_le_bytes(*a)).collect()
    }
}

fn fixture_path(name: &str) -> PathBuf {
    let d = fixture_dir();
    let nii = d.join(format!("{name}.nii"));
    if nii.exists() {
        nii
    } else {
        d.join(format!("{name}.nii.gz"))
    }
}

fn flat(a: &[[f64; 4]; 4]) -> Vec<f64> {
    a.iter().flatten().copied().collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, nibabel {w} (|diff| {})",
            (g - w).abs()
        );
    }
}

#[test]
fn every_fixture_matches_nibabel() {
    let exp = Expected::load();
    let names = exp.names();
    assert!(names.len() >= 17, "fixtures: {names:?}");
    for name in &names {
        let path = fixture_path(name);
        let v = read_nifti(&path).unwrap_or_else(|e| panic!("{e}"));
        let h = &v.header;
        let dims: Vec<usize> = exp
            .i64s(&format!("{name}.dims"))
            .iter()
            .map(|&d| d as usize)
            .collect();
        assert_eq!(v.dims.to_vec(), dims, "{name} dims");
        assert_eq!(h.dims(), v.dims, "{name} header dims");
        assert_eq!(v.path, path);

        let want = exp.f32s(&format!("{name}.data"));
        assert_eq!(v.data.len(), want.len(), "{name} data length");
        for (i, (g, w)) in v.data.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} voxel {i}: got {g}, nibabel {w}"
            );
        }

        let zooms = exp.f64s(&format!("{name}.zooms")).unwrap();
        assert_close(&format!("{name} spacing"), &h.spacing(), &zooms, 1e-6);
        let aff = exp.f64s(&format!("{name}.affine")).unwrap();
        assert_close(&format!("{name} affine"), &flat(&h.affine()), &aff, 1e-6);

        let codes = exp.i64s(&format!("{name}.codes"));
        assert_eq!(
            [h.qform_code() as i64, h.sform_code() as i64],
            [codes[0], codes[1]],
            "{name} codes"
        );
        if let Some(q) = exp.f64s(&format!("{name}.qform")) {
            assert_close(&format!("{name} qform"), &flat(&h.qform_affine()), &q, 1e-6);
        }
        if let Some(s) = exp.f64s(&format!("{name}.sform")) {
            assert_close(&format!("{name} sform"), &flat(&h.sform_affine()), &s, 1e-6);
        }
    }
}

#[test]
fn fixtures_cover_the_cases() {
    let exp = Expected::load();
    let names = exp.names();
    for dt in [
        "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32",
        "float64",
    ] {
        assert!(names.contains(&format!("dtype_{dt}")), "no {dt} fixture");
    }
    let h = |n: &str| read_nifti(&fixture_path(n)).unwrap().header;
    assert_eq!(h("scaled_int16").scaling(), (2.0, -3.0));
    assert!(h("bigendian_int16").is_big_endian());
    assert!(!h("dtype_int16").is_big_endian());
    assert!(fixture_path("gzip_float32")
        .to_string_lossy()
        .ends_with(".nii.gz"));
    let o = h("oblique_float32");
    assert_eq!((o.qform_code(), o.sform_code()), (1, 2));
    assert_eq!(o.spacing(), [0.7f32 as f64, 1.3f32 as f64, 2.5]);
    let q = h("qform_only_int16");
    assert_eq!(
        (q.qform_code(), q.sform_code(), q.pixdim()[0]),
        (1, 0, -1.0)
    );
    assert_eq!(h("flat2d_uint8").raw_dim()[0], 2);
    assert_eq!(h("single4d_int16").raw_dim()[..5], [4, 7, 6, 5, 1]);
}

#[test]
fn slices_are_row_j_column_i() {
    let v = read_nifti(&fixture_path("dtype_uint8")).unwrap();
    let (nx, ny, nz) = volume_slices(&v);
    assert_eq!((nx, ny, nz), (7, 6, 5));
    // The fixture's value at (i, j, k) is i + 7 j + 42 k.
    let s = v.slice(3).unwrap();
    assert_eq!(s.len(), nx * ny);
    let (row, col) = (4, 2);
    assert_eq!(s[row * nx + col], (col + 7 * row + 42 * 3) as f32);
    assert!(v.slice(5).is_none());
    let f = read_nifti(&fixture_path("flat2d_uint8")).unwrap();
    assert_eq!(volume_slices(&f), (7, 6, 1));
}

/// Geometry fields: dim, pixdim, xyzt_units, qform_code..srow_z (quatern_*, qoffset_*, srow_*).
fn geometry_bytes(raw: &[u8; 348]) -> Vec<u8> {
    [&raw[40..56], &raw[76..108], &raw[123..124], &raw[252..328]].concat()
}

fn assert_same_grid(a: &NiftiHeader, b: &NiftiHeader, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what} dims");
    assert_eq!(a.spacing(), b.spacing(), "{what} spacing");
    assert_eq!(a.affine(), b.affine(), "{what} affine");
    assert_eq!(a.qform_affine(), b.qform_affine(), "{what} qform");
    assert_eq!(a.sform_affine(), b.sform_affine(), "{what} sform");
    assert_eq!(
        (a.qform_code(), a.sform_code()),
        (b.qform_code(), b.sform_code()),
        "{what} codes"
    );
    assert_eq!(a.xyzt_units(), b.xyzt_units(), "{what} xyzt_units");
    assert_eq!(a.is_big_endian(), b.is_big_endian(), "{what} byte order");
    assert_eq!(
        geometry_bytes(a.raw_bytes()),
        geometry_bytes(b.raw_bytes()),
        "{what}: geometry header bytes differ"
    );
}

#[test]
fn written_outputs_keep_the_grid() {
    let dir = scratch("write");
    for src_name in [
        "oblique_float32",
        "qform_only_int16",
        "bigendian_int16",
        "single4d_int16",
        "flat2d_uint8",
        "gzip_float32",
    ] {
        let src = read_nifti(&fixture_path(src_name)).unwrap();
        let like = &src.header;
        let n = src.data.len();
        let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 5) as u8).collect();
        let probs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).sin()).collect();
        for ext in ["nii", "nii.gz"] {
            let lp = dir.join(format!("{src_name}_labels.{ext}"));
            write_labels(&lp, like, &labels).unwrap();
            let back = read_nifti(&lp).unwrap();
            assert_same_grid(like, &back.header, &lp.display().to_string());
            assert_eq!(back.header.datatype(), 2);
            assert_eq!(back.header.scaling(), (1.0, 0.0));
            assert_eq!(back.dims, src.dims);
            let got: Vec<u8> = back.data.iter().map(|&v| v as u8).collect();
            assert_eq!(got, labels, "{}", lp.display());

            let pp = dir.join(format!("{src_name}_probs.{ext}"));
            write_f32(&pp, like, &probs).unwrap();
            let back = read_nifti(&pp).unwrap();
            assert_same_grid(like, &back.header, &pp.display().to_string());
            assert_eq!(back.header.datatype(), 16);
            assert_eq!(back.header.scaling(), (1.0, 0.0));
            assert_eq!(back.data, probs, "{}", pp.display());

            let bytes = std::fs::read(&pp).unwrap();
            assert_eq!(
                ext == "nii.gz",
                bytes[..2] == [0x1f, 0x8b],
                "{}",
                pp.display()
            );
            if ext == "nii" {
                assert_eq!(bytes.len(), 352 + 4 * n);
            }
        }
    }
    // Atomic writes leave no temp files behind; overwriting works.
    let src = read_nifti(&fixture_path("oblique_float32")).unwrap();
    let p = dir.join("again.nii");
    write_f32(&p, &src.header, &src.data).unwrap();
    write_f32(&p, &src.header, &src.data).unwrap();
    assert_eq!(read_nifti(&p).unwrap().data, src.data);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn write_rejects_wrong_length() {
    let dir = scratch("wrong-len");
    let src = read_nifti(&fixture_path("oblique_float32")).unwrap();
    let p = dir.join("x.nii");
    assert!(matches!(
        write_labels(&p, &src.header, &[0u8; 3]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        write_f32(&p, &src.header, &[0f32; 211]),
        Err(Error::Shape { .. })
    ));
    assert!(!p.exists());
    let missing = dir.join("no/such/folder/x.nii");
    let e = write_f32(&missing, &src.header, &src.data).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

fn expect_format_err(path: &Path, field: &str) {
    match read_nifti(path) {
        Err(e @ Error::Format { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains(&*path.to_string_lossy()),
                "{m:?} should name the file"
            );
            assert!(m.contains(field), "{m:?} should name {field}");
        }
        Err(e) => panic!("{}: expected a format error, got {e}", path.display()),
        Ok(_) => panic!("{}: read a malformed file", path.display()),
    }
}

#[test]
fn malformed_inputs_are_errors() {
    let dir = scratch("bad");
    let good = std::fs::read(fixture_path("dtype_int16")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };

    // Truncated: in the header, and in the data.
    expect_format_err(&write("short_header.nii", &good[..100]), "348-byte");
    expect_format_err(
        &write("short_data.nii", &good[..good.len() - 1]),
        "truncated",
    );
    expect_format_err(&write("empty.nii", &[]), "sizeof_hdr");

    // Random bytes (a fixed xorshift stream).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    expect_format_err(&write("noise.nii", &noise), "sizeof_hdr");
    expect_format_err(&write("noise.nii.gz", &noise), "not gzip");

    // A plain .nii named .nii.gz, and a gzip stream cut short.
    expect_format_err(&write("plain.nii.gz", &good), "not gzip");
    let gz = std::fs::read(fixture_path("gzip_float32")).unwrap();
    expect_format_err(&write("cut.nii.gz", &gz[..gz.len() / 2]), "gzip");

    // Header fields.
    let patched = |name: &str, off: usize, val: &[u8]| {
        let mut b = good.clone();
        b[off..off + val.len()].copy_from_slice(val);
        write(name, &b)
    };
    expect_format_err(&patched("magic.nii", 344, b"abc\0"), "magic");
    expect_format_err(&patched("nifti2.nii", 0, &540i32.to_le_bytes()), "NIfTI-2");
    expect_format_err(
        &patched("vox.nii", 108, &f32::NAN.to_le_bytes()),
        "vox_offset",
    );
    expect_format_err(
        &patched("vox2.nii", 108, &1e9f32.to_le_bytes()),
        "vox_offset",
    );
    expect_format_err(
        &patched("complex.nii", 70, &32i16.to_le_bytes()),
        "COMPLEX64",
    );
    expect_format_err(&patched("rgb.nii", 70, &128i16.to_le_bytes()), "RGB24");
    let mut b = good.clone();
    b[40..42].copy_from_slice(&4i16.to_le_bytes());
    b[48..50].copy_from_slice(&3i16.to_le_bytes());
    expect_format_err(&write("multi.nii", &b), "more than one volume");

    // A missing file is an I/O error naming it.
    let missing = dir.join("missing.nii");
    let e = read_nifti(&missing).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("missing.nii"));
}

#[test]
fn no_codes_falls_back_to_spacing() {
    let dir = scratch("nocodes");
    let mut b = std::fs::read(fixture_path("oblique_float32")).unwrap();
    b[252..256].fill(0);
    let p = dir.join("nocodes.nii");
    std::fs::write(&p, &b).unwrap();
    let h = read_nifti(&p).unwrap().header;
    let s = h.spacing();
    let a = h.affine();
    for (r, row) in a.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let want = match (r, c) {
                (3, 3) => 1.0,
                (r, c) if r == c => s[r],
                _ => 0.0,
            };
            assert_eq!(v, want, "affine[{r}][{c}]");
        }
    }
    // qform only: the qform is used (and matches the sform nibabel wrote from the same affine).
    b[254..256].fill(0);
    b[252..254].copy_from_slice(&1i16.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let h2 = read_nifti(&p).unwrap().header;
    let (q, sf) = (flat(&h2.affine()), flat(&h2.sform_affine()));
    assert_close("qform vs sform", &q, &sf, 1e-6);
}
