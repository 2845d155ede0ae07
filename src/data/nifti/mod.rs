//! NIfTI-1 volumes: read scans (`.nii`, `.nii.gz`) as `f32` intensities and write label maps or
//! probability maps on exactly the scan's grid.
//!
//! # Coordinate convention
//!
//! - A voxel index `(i, j, k)` is the array order in the file: `i` runs along `dim[1]` (x, fastest
//!   in memory), `j` along `dim[2]`, `k` along `dim[3]` (slowest). [`NiftiVolume::data`] keeps that
//!   order: voxel `(i, j, k)` is `data[i + nx * (j + ny * k)]`.
//! - No reorientation is done: the world position of a voxel is `affine() * [i, j, k, 1]`
//!   ([`NiftiHeader::affine`]), whatever the orientation (RAS, LPS, oblique) of the scan.
//! - 2-D work takes slices along the third axis `k`. Slice `k` is the contiguous run
//!   `data[k*nx*ny .. (k+1)*nx*ny]`, read as an image of `ny` rows by `nx` columns:
//!   **row = j, column = i** ([`NiftiVolume::slice`], [`volume_slices`]).
//! - Outputs ([`write_labels`], [`write_f32`]) use the same order, so a mask computed on slice `k`
//!   at (row j, column i) lands on voxel `(i, j, k)` of the scan.
//!
//! # What is read
//!
//! Single-file NIfTI-1 (magic `n+1`), either byte order (detected from `sizeof_hdr == 348`),
//! optionally gzipped (detected from the gzip magic; a name ending in `.gz` must be gzip).
//! Datatypes UINT8, INT8, INT16, UINT16, INT32, UINT32, INT64, UINT64, FLOAT32, FLOAT64; values
//! are converted through `f64`, scaled by `scl_slope`/`scl_inter` when `scl_slope` is finite and
//! non-zero (the NIfTI rule; a NaN slope, as nibabel writes, means no scaling), then rounded to
//! `f32`. A 4-D file with `dim[4] == 1` (and any higher dims 1) is a 3-D volume; a 2-D file is a
//! volume with `nz = 1`. Not supported, each an [`Error::Format`] naming the file and the field:
//! NIfTI-2, `.hdr`/`.img` pairs, complex/RGB/FLOAT128/BINARY data, more than one volume.
//! Header extensions are skipped.
//!
//! # What is written
//!
//! The 348-byte header of the reference scan, copied byte for byte (so `dim`, `pixdim`,
//! `qform_code`/`sform_code`, the quaternion, the offsets, `srow_*`, `xyzt_units`, and the byte
//! order are those of the scan), with only the data description patched: `datatype`/`bitpix`
//! (UINT8 or FLOAT32), `vox_offset = 352`, `scl_slope = 1`, `scl_inter = 0`,
//! `cal_min = cal_max = 0`, the intent fields cleared, `descrip`, and the magic `n+1`. No
//! extensions. The data follow in the header's byte order.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Size of a NIfTI-1 header.
const HDR_LEN: usize = 348;
/// Where the data start in the files we write (header + 4-byte empty extension flag).
const VOX_OFFSET_OUT: usize = 352;

// Byte offsets of the NIfTI-1 header fields we use.
const OFF_DIM: usize = 40;
const OFF_INTENT_P1: usize = 56;
const OFF_INTENT_CODE: usize = 68;
const OFF_DATATYPE: usize = 70;
const OFF_BITPIX: usize = 72;
const OFF_PIXDIM: usize = 76;
const OFF_VOX_OFFSET: usize = 108;
const OFF_SCL_SLOPE: usize = 112;
const OFF_SCL_INTER: usize = 116;
const OFF_XYZT_UNITS: usize = 123;
const OFF_CAL_MAX: usize = 124;
const OFF_CAL_MIN: usize = 128;
const OFF_GLMAX: usize = 140;
const OFF_DESCRIP: usize = 148;
const OFF_QFORM_CODE: usize = 252;
const OFF_SFORM_CODE: usize = 254;
const OFF_QUATERN_B: usize = 256;
const OFF_QOFFSET_X: usize = 268;
const OFF_SROW_X: usize = 280;
const OFF_INTENT_NAME: usize = 328;
const OFF_MAGIC: usize = 344;

/// NIfTI datatype codes.
const DT_UINT8: i16 = 2;
const DT_FLOAT32: i16 = 16;

/// A NIfTI volume: intensities as f32 after scl_slope/scl_inter, in file (array) order, x fastest.
#[derive(Clone, Debug)]
pub struct NiftiVolume {
    /// `(nx, ny, nz)`; `nz = 1` for a 2-D file.
    pub dims: [usize; 3],
    /// `nx * ny * nz` values, voxel `(i, j, k)` at `i + nx * (j + ny * k)`.
    pub data: Vec<f32>,
    /// The header, to write outputs on the same grid.
    pub header: NiftiHeader,
    /// The file it was read from.
    pub path: PathBuf,
}

impl NiftiVolume {
    /// Slice `k` along the third axis: `ny` rows of `nx` values (row = j, column = i), or `None`
    /// when `k >= nz`.
    pub fn slice(&self, k: usize) -> Option<&[f32]> {
        let [nx, ny, nz] = self.dims;
        (k < nz).then(|| &self.data[k * nx * ny..(k + 1) * nx * ny])
    }
}

/// `(nx, ny, nz)` of a volume: slices are taken along k (`nz` of them), each an image of `ny` rows
/// (j) by `nx` columns (i). See the module documentation for the convention.
pub fn volume_slices(v: &NiftiVolume) -> (usize, usize, usize) {
    let [nx, ny, nz] = v.dims;
    (nx, ny, nz)
}

/// The 348 header bytes exactly as stored in the file (its byte order).
#[derive(Clone, PartialEq, Eq)]
struct RawHeader([u8; HDR_LEN]);

impl std::fmt::Debug for RawHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{HDR_LEN} header bytes>")
    }
}

/// Header geometry and everything needed to write an output on the same grid.
#[derive(Clone, Debug)]
pub struct NiftiHeader {
    raw: RawHeader,
    big_endian: bool,
    dims: [usize; 3],
    dim: [i16; 8],
    datatype: i16,
    pixdim: [f32; 8],
    vox_offset: usize,
    scl_slope: f32,
    scl_inter: f32,
    xyzt_units: u8,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 3],
    qoffset: [f32; 3],
    srow: [[f32; 4]; 3],
}

/// Reads fields of a header in a given byte order.
#[derive(Clone, Copy)]
struct Fields<'a> {
    b: &'a [u8],
    big: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[off..off + N]);
        a
    }
    fn i16(&self, off: usize) -> i16 {
        let a = self.bytes(off);
        if self.big {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn f32(&self, off: usize) -> f32 {
        let a = self.bytes(off);
        if self.big {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        }
    }
}

/// Patches fields of a header in a given byte order.
struct FieldsMut<'a> {
    b: &'a mut [u8],
    big: bool,
}

impl FieldsMut<'_> {
    fn put(&mut self, off: usize, le: &[u8], be: &[u8]) {
        let src = if self.big { be } else { le };
        self.b[off..off + src.len()].copy_from_slice(src);
    }
    fn i16(&mut self, off: usize, v: i16) {
        self.put(off, &v.to_le_bytes(), &v.to_be_bytes());
    }
    fn i32(&mut self, off: usize, v: i32) {
        self.put(off, &v.to_le_bytes(), &v.to_be_bytes());
    }
    fn f32(&mut self, off: usize, v: f32) {
        self.put(off, &v.to_le_bytes(), &v.to_be_bytes());
    }
    fn text(&mut self, off: usize, len: usize, s: &str) {
        let field = &mut self.b[off..off + len];
        field.fill(0);
        let n = s.len().min(len - 1);
        field[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
}

/// A NIfTI datatype we can read, with its storage size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DType {
    fn from_code(code: i16) -> std::result::Result<Self, String> {
        Ok(match code {
            2 => DType::U8,
            256 => DType::I8,
            4 => DType::I16,
            512 => DType::U16,
            8 => DType::I32,
            768 => DType::U32,
            1024 => DType::I64,
            1280 => DType::U64,
            16 => DType::F32,
            64 => DType::F64,
            _ => {
                let name = match code {
                    1 => "BINARY",
                    32 => "COMPLEX64",
                    128 => "RGB24",
                    1536 => "FLOAT128",
                    1792 => "COMPLEX128",
                    2048 => "COMPLEX256",
                    2304 => "RGBA32",
                    _ => return Err(format!("datatype {code} is not a NIfTI-1 datatype code")),
                };
                return Err(format!(
                    "datatype {code} ({name}) is not supported; expected a real scalar type \
                     (UINT8, INT8, INT16, UINT16, INT32, UINT32, INT64, UINT64, FLOAT32, FLOAT64)"
                ));
            }
        })
    }
    fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DType::U8 => "UINT8",
            DType::I8 => "INT8",
            DType::I16 => "INT16",
            DType::U16 => "UINT16",
            DType::I32 => "INT32",
            DType::U32 => "UINT32",
            DType::I64 => "INT64",
            DType::U64 => "UINT64",
            DType::F32 => "FLOAT32",
            DType::F64 => "FLOAT64",
        }
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl NiftiHeader {
    /// Parses and validates a NIfTI-1 header from the start of `bytes` (the whole decompressed
    /// file), including that the voxel data fit in it. `path` is only used in error messages.
    #[cfg(test)]
    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let h = Self::parse_header(bytes, path)?;
        h.check_data_fits(bytes.len() as u64, path)?;
        Ok(h)
    }

    /// Bytes of voxel data the header describes (checked not to overflow by `parse_header`).
    fn data_len(&self) -> usize {
        let size = DType::from_code(self.datatype).map_or(1, DType::size);
        self.dims.iter().product::<usize>() * size
    }

    /// Checks that a file of `total` bytes holds the header's voxel data after `vox_offset`.
    fn check_data_fits(&self, total: u64, path: &Path) -> Result<()> {
        let err = |msg: String| format_err(path, msg);
        let vox_offset = self.vox_offset as u64;
        if vox_offset > total {
            return Err(err(format!(
                "vox_offset = {vox_offset} is past the end of the file ({total} bytes)"
            )));
        }
        let need = self.data_len() as u64;
        let have = total - vox_offset;
        if have < need {
            let dtype = DType::from_code(self.datatype).map_err(err)?;
            return Err(err(format!(
                "voxel data is {have} bytes after vox_offset {vox_offset}, but dims {:?} of \
                 {} ({} bytes each) need {need} (file truncated?)",
                self.dims,
                dtype.name(),
                dtype.size()
            )));
        }
        Ok(())
    }

    /// Parses and validates the 348-byte header at the start of `bytes` (what follows is not
    /// looked at). `path` is only used in error messages.
    fn parse_header(bytes: &[u8], path: &Path) -> Result<Self> {
        let err = |msg: String| format_err(path, msg);
        if bytes.len() < 4 {
            return Err(err(format!(
                "file is {} bytes, too short for a NIfTI header (sizeof_hdr missing)",
                bytes.len()
            )));
        }
        let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let big = if le == HDR_LEN as i32 {
            false
        } else if be == HDR_LEN as i32 {
            true
        } else if le == 540 || be == 540 {
            return Err(err(
                "NIfTI-2 not supported (sizeof_hdr = 540); convert to NIfTI-1".into(),
            ));
        } else {
            return Err(err(format!(
                "sizeof_hdr is {le} (byte-swapped {be}), expected 348: not a NIfTI-1 file"
            )));
        };
        if bytes.len() < HDR_LEN {
            return Err(err(format!(
                "file is {} bytes, shorter than the 348-byte NIfTI-1 header (truncated)",
                bytes.len()
            )));
        }
        let f = Fields { b: bytes, big };
        let magic: [u8; 4] = f.bytes(OFF_MAGIC);
        match &magic {
            b"n+1\0" => {}
            b"ni1\0" => {
                return Err(err(
                    "magic is \"ni1\" (a .hdr/.img pair): only single-file \
                     NIfTI-1 (.nii, magic \"n+1\") is supported"
                        .into(),
                ))
            }
            _ => {
                return Err(err(format!(
                    "bad magic {:?}, expected \"n+1\"",
                    String::from_utf8_lossy(&magic)
                )))
            }
        }

        let mut dim = [0i16; 8];
        for (d, v) in dim.iter_mut().enumerate() {
            *v = f.i16(OFF_DIM + 2 * d);
        }
        let ndim = dim[0];
        if !(1..=7).contains(&ndim) {
            return Err(err(format!(
                "dim[0] = {ndim}, expected 1..=7 (dim = {dim:?})"
            )));
        }
        let ndim = ndim as usize;
        let used = &dim[1..=ndim];
        if let Some(d) = used.iter().position(|&d| d < 1) {
            return Err(err(format!(
                "dim[{}] = {}, every used dimension must be >= 1 (dim = {dim:?})",
                d + 1,
                used[d]
            )));
        }
        if used.iter().skip(3).any(|&d| d != 1) {
            return Err(err(format!(
                "dims {used:?}: more than one volume; only 3-D volumes (or 4-D with dim[4] = 1) \
                 are supported"
            )));
        }
        let dims = [0, 1, 2].map(|a| if a < ndim { used[a] as usize } else { 1 });

        let datatype = f.i16(OFF_DATATYPE);
        let dtype = DType::from_code(datatype).map_err(err)?;

        let vo = f.f32(OFF_VOX_OFFSET);
        if !(vo.is_finite() && vo.fract() == 0.0 && vo >= HDR_LEN as f32) {
            return Err(err(format!(
                "vox_offset = {vo}, expected a whole number >= 348"
            )));
        }
        let vox_offset = vo as usize;
        dims.iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| err(format!("dims {dims:?} are too large to address")))?;

        let mut pixdim = [0f32; 8];
        for (d, v) in pixdim.iter_mut().enumerate() {
            *v = f.f32(OFF_PIXDIM + 4 * d);
        }
        let mut srow = [[0f32; 4]; 3];
        for (r, row) in srow.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = f.f32(OFF_SROW_X + 16 * r + 4 * c);
            }
        }
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&bytes[..HDR_LEN]);
        Ok(NiftiHeader {
            raw: RawHeader(raw),
            big_endian: big,
            dims,
            dim,
            datatype,
            pixdim,
            vox_offset,
            scl_slope: f.f32(OFF_SCL_SLOPE),
            scl_inter: f.f32(OFF_SCL_INTER),
            xyzt_units: bytes[OFF_XYZT_UNITS],
            qform_code: f.i16(OFF_QFORM_CODE),
            sform_code: f.i16(OFF_SFORM_CODE),
            quatern: [0, 1, 2].map(|i| f.f32(OFF_QUATERN_B + 4 * i)),
            qoffset: [0, 1, 2].map(|i| f.f32(OFF_QOFFSET_X + 4 * i)),
            srow,
        })
    }

    /// `(nx, ny, nz)`: `dim[1..=3]`, with 1 for dimensions the file does not have.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Voxel size in mm: `|pixdim[1..=3]|`, 1.0 where a value is zero or not finite.
    pub fn spacing(&self) -> [f64; 3] {
        [1, 2, 3].map(|d| {
            let p = (self.pixdim[d] as f64).abs();
            if p.is_finite() && p > 0.0 {
                p
            } else {
                1.0
            }
        })
    }

    /// Voxel-to-world affine: the sform if `sform_code > 0`, else the qform if `qform_code > 0`,
    /// else `diag(spacing, 1)`.
    ///
    /// The last fallback differs from nibabel, whose `get_best_affine` then centres the volume and
    /// flips x (the old ANALYZE convention); a file with neither code has no defined world
    /// position, and the plain scaling keeps voxel (0, 0, 0) at the origin.
    pub fn affine(&self) -> [[f64; 4]; 4] {
        if self.sform_code > 0 {
            self.sform_affine()
        } else if self.qform_code > 0 {
            self.qform_affine()
        } else {
            let s = self.spacing();
            let mut a = [[0.0; 4]; 4];
            for d in 0..3 {
                a[d][d] = s[d];
            }
            a[3][3] = 1.0;
            a
        }
    }

    /// The sform matrix (`srow_x`, `srow_y`, `srow_z`, `[0 0 0 1]`), whatever `sform_code` says.
    pub fn sform_affine(&self) -> [[f64; 4]; 4] {
        let mut a = [[0.0, 0.0, 0.0, 1.0]; 4];
        for (row, srow) in a.iter_mut().zip(&self.srow) {
            *row = srow.map(f64::from);
        }
        a
    }

    /// The qform matrix (quaternion, `pixdim[1..=3]`, `qfac = pixdim[0]`, offsets; NIfTI-1
    /// method 2), whatever `qform_code` says.
    pub fn qform_affine(&self) -> [[f64; 4]; 4] {
        let [mut b, mut c, mut d] = self.quatern.map(f64::from);
        let n2 = b * b + c * c + d * d;
        let mut a = 1.0 - n2;
        if a < 1e-7 {
            // (b, c, d) is (numerically) a unit vector: a 180-degree rotation.
            let s = 1.0 / n2.sqrt();
            if s.is_finite() {
                b *= s;
                c *= s;
                d *= s;
            }
            a = 0.0;
        } else {
            a = a.sqrt();
        }
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let zoom = |p: f32| if p > 0.0 { p as f64 } else { 1.0 };
        let qfac = if self.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [
            zoom(self.pixdim[1]),
            zoom(self.pixdim[2]),
            zoom(self.pixdim[3]) * qfac,
        ];
        let mut m = [[0.0, 0.0, 0.0, 1.0]; 4];
        for row in 0..3 {
            for col in 0..3 {
                m[row][col] = r[row][col] * s[col];
            }
            m[row][3] = self.qoffset[row] as f64;
        }
        m
    }

    /// `qform_code` (0 unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI).
    pub fn qform_code(&self) -> i16 {
        self.qform_code
    }

    /// `sform_code` (same codes as [`Self::qform_code`]).
    pub fn sform_code(&self) -> i16 {
        self.sform_code
    }

    /// The NIfTI datatype code of the file (2 UINT8, 4 INT16, 16 FLOAT32, ...).
    pub fn datatype(&self) -> i16 {
        self.datatype
    }

    /// The `dim` field as stored (`dim[0]` = number of dimensions).
    pub fn raw_dim(&self) -> [i16; 8] {
        self.dim
    }

    /// The `pixdim` field as stored (`pixdim[0]` = qfac).
    pub fn pixdim(&self) -> [f32; 8] {
        self.pixdim
    }

    /// `(scl_slope, scl_inter)` as stored (not yet interpreted; see [`read_nifti`]).
    pub fn scaling(&self) -> (f32, f32) {
        (self.scl_slope, self.scl_inter)
    }

    /// `xyzt_units` as stored.
    pub fn xyzt_units(&self) -> u8 {
        self.xyzt_units
    }

    /// Whether the file is big-endian (outputs written `like` it are too).
    pub fn is_big_endian(&self) -> bool {
        self.big_endian
    }

    /// The 348 header bytes exactly as stored in the file.
    pub fn raw_bytes(&self) -> &[u8; HDR_LEN] {
        &self.raw.0
    }

    /// The `(slope, inter)` to apply, or `None` for none: the NIfTI rule (`scl_slope == 0` means
    /// unscaled) extended as nibabel does to a non-finite slope; a non-finite intercept is 0.
    fn effective_scaling(&self) -> Option<(f64, f64)> {
        let slope = self.scl_slope as f64;
        if !slope.is_finite() || slope == 0.0 {
            return None;
        }
        let inter = self.scl_inter as f64;
        let inter = if inter.is_finite() { inter } else { 0.0 };
        (slope != 1.0 || inter != 0.0).then_some((slope, inter))
    }
}

fn has_gz_name(path: &Path) -> bool {
    path.file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase().ends_with(".gz"))
        .unwrap_or(false)
}

/// Converts `src` (exactly `n * size` bytes of `dtype`) to f32, applying `scale`.
fn decode(src: &[u8], dtype: DType, big: bool, scale: Option<(f64, f64)>) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {{
            let to = |c: &[u8]| -> f64 {
                let mut a = [0u8; $n];
                a.copy_from_slice(c);
                (if big {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                }) as f64
            };
            match scale {
                None => src.chunks_exact($n).map(|c| to(c) as f32).collect(),
                Some((m, b)) => src
                    .chunks_exact($n)
                    .map(|c| (to(c) * m + b) as f32)
                    .collect(),
            }
        }};
    }
    match dtype {
        DType::U8 => conv!(u8, 1),
        DType::I8 => conv!(i8, 1),
        DType::I16 => conv!(i16, 2),
        DType::U16 => conv!(u16, 2),
        DType::I32 => conv!(i32, 4),
        DType::U32 => conv!(u32, 4),
        DType::I64 => conv!(i64, 8),
        DType::U64 => conv!(u64, 8),
        DType::F32 => conv!(f32, 4),
        DType::F64 => conv!(f64, 8),
    }
}

mod read;
pub use read::{read_nifti, read_nifti_limited};
mod write;
pub use write::{write_f32, write_labels};

#[cfg(test)]
mod tests;
