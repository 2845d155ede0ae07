//! Writing NIfTI-1 label and probability maps on a reference scan's grid (the module
//! documentation's "What is written"), atomically.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::{Error, Result};

/// Writes `data` (x fastest, dims = like.dims()) on exactly `like`'s grid: same dim, pixdim,
/// qform/sform codes and parameters, xyzt_units, so it overlays in any viewer; datatype UINT8;
/// scl_slope 1, scl_inter 0; gzip when the name ends in .gz; atomic (temp file in the same
/// folder + rename).
pub fn write_labels(path: &Path, like: &NiftiHeader, data: &[u8]) -> Result<()> {
    check_len("write_labels", path, like, data.len())?;
    write_volume(path, like, DT_UINT8, 8, "medsa labels", |w| {
        w.write_all(data)
    })
}

/// Writes `data` (x fastest, dims = like.dims()) on exactly `like`'s grid (see
/// [`write_labels`]); datatype FLOAT32.
pub fn write_f32(path: &Path, like: &NiftiHeader, data: &[f32]) -> Result<()> {
    check_len("write_f32", path, like, data.len())?;
    let big = like.big_endian;
    write_volume(path, like, DT_FLOAT32, 32, "medsa probabilities", |w| {
        let mut buf = Vec::with_capacity(4 * 16384);
        for chunk in data.chunks(16384) {
            buf.clear();
            for v in chunk {
                buf.extend_from_slice(&if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                });
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })
}

fn check_len(op: &'static str, path: &Path, like: &NiftiHeader, n: usize) -> Result<()> {
    let [nx, ny, nz] = like.dims;
    if n != nx * ny * nz {
        return Err(Error::shape(
            op,
            format!(
                "{}: {n} values for a {nx}x{ny}x{nz} grid ({} voxels)",
                path.display(),
                nx * ny * nz
            ),
        ));
    }
    Ok(())
}

/// The output header: `like`'s bytes with the data description patched.
pub(super) fn output_header(
    like: &NiftiHeader,
    datatype: i16,
    bitpix: i16,
    descrip: &str,
) -> [u8; 352] {
    let mut out = [0u8; VOX_OFFSET_OUT];
    out[..HDR_LEN].copy_from_slice(&like.raw.0);
    let mut f = FieldsMut {
        b: &mut out[..HDR_LEN],
        big: like.big_endian,
    };
    f.i32(0, HDR_LEN as i32);
    for i in 0..3 {
        f.f32(OFF_INTENT_P1 + 4 * i, 0.0);
    }
    f.i16(OFF_INTENT_CODE, 0);
    f.i16(OFF_DATATYPE, datatype);
    f.i16(OFF_BITPIX, bitpix);
    f.f32(OFF_VOX_OFFSET, VOX_OFFSET_OUT as f32);
    f.f32(OFF_SCL_SLOPE, 1.0);
    f.f32(OFF_SCL_INTER, 0.0);
    f.f32(OFF_CAL_MAX, 0.0);
    f.f32(OFF_CAL_MIN, 0.0);
    f.i32(OFF_GLMAX, 0);
    f.i32(OFF_GLMAX + 4, 0);
    f.text(OFF_DESCRIP, 80, descrip);
    f.text(OFF_INTENT_NAME, 16, "");
    f.b[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(b"n+1\0");
    // out[348..352] stays 0: no extensions.
    out
}

/// Distinguishes temp files of concurrent writes from one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_volume(
    path: &Path,
    like: &NiftiHeader,
    datatype: i16,
    bitpix: i16,
    descrip: &str,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let header = output_header(like, datatype, bitpix, descrip);
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let file = File::create_new(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let file = if has_gz_name(path) {
            let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::default());
            gz.write_all(&header)?;
            body(&mut gz)?;
            gz.finish()?.into_inner().map_err(|e| e.into_error())?
        } else {
            w.write_all(&header)?;
            body(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?
        };
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        // Named by the file asked for: the temporary name would only puzzle the user.
        return Err(io_err(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}
