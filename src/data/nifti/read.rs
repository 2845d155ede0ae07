//! Reading a NIfTI-1 file: streamed (through gzip when it is gzip) and bounded by what the
//! header claims and by the voxel budget, so a header or a decompression bomb cannot make the
//! reader allocate more than the budget allows.

use std::io::Read;
use std::path::Path;

use super::decode;
use super::{format_err, has_gz_name, io_err, DType, NiftiHeader, NiftiVolume, HDR_LEN};
use crate::{Error, Result};

/// Reads up to `n` bytes (fewer only at the end of the stream).
fn read_up_to(r: &mut impl Read, n: usize, path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(n as u64)
        .read_to_end(&mut buf)
        .map_err(|e| stream_err(path, e, what))?;
    Ok(buf)
}

/// A read error: a corrupt gzip stream is a format error, anything else an I/O error.
fn stream_err(path: &Path, e: std::io::Error, what: &str) -> Error {
    match e.kind() {
        std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::UnexpectedEof => format_err(
            path,
            format!("gzip data is corrupt or truncated (reading the {what}): {e}"),
        ),
        _ => io_err(path, e),
    }
}

/// Reads a NIfTI-1 volume (`.nii` or `.nii.gz`) within the process default budgets
/// ([`crate::limits::current`]); see the module documentation for what is supported. Every
/// malformed input is an `Err` naming the file and the field.
pub fn read_nifti(path: &Path) -> Result<NiftiVolume> {
    read_nifti_limited(path, &crate::limits::current())
}

/// [`read_nifti`] within explicit budgets.
///
/// The file is streamed (through gzip when it is gzip): the header is read and checked, the
/// volume's size is checked against `limits.max_voxels`, and then exactly the bytes the header
/// describes are read, so neither a header claiming a huge volume nor a decompression bomb can
/// make it allocate more than the budget allows.
pub fn read_nifti_limited(path: &Path, limits: &crate::limits::Limits) -> Result<NiftiVolume> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut file = std::io::BufReader::new(file);
    let sniff = read_up_to(&mut file, 2, path, "file start")?;
    let is_gzip = sniff == [0x1f, 0x8b];
    if !is_gzip && has_gz_name(path) {
        let head = read_up_to(&mut file, 2, path, "file start")?;
        let first: Vec<u8> = sniff.iter().chain(&head).copied().collect();
        return Err(format_err(
            path,
            format!("name ends in .gz but the file is not gzip (first bytes {first:02x?})"),
        ));
    }
    let rest = std::io::Cursor::new(sniff).chain(file);
    let mut src: Box<dyn Read> = if is_gzip {
        Box::new(flate2::read::MultiGzDecoder::new(rest))
    } else {
        Box::new(rest)
    };
    let head = read_up_to(&mut src, HDR_LEN, path, "header")?;
    let header = NiftiHeader::parse_header(&head, path)?;
    limits.check_voxels(path, header.dims)?;
    if !is_gzip {
        header.check_data_fits(file_len, path)?;
    }
    // Extensions (or padding) between the header and the data: skipped, never stored.
    let skip = (header.vox_offset - HDR_LEN) as u64;
    let skipped = std::io::copy(&mut (&mut src).take(skip), &mut std::io::sink())
        .map_err(|e| stream_err(path, e, "header extensions"))?;
    if skipped < skip {
        return Err(format_err(
            path,
            format!(
                "vox_offset = {} is past the end of the file ({} bytes)",
                header.vox_offset,
                HDR_LEN as u64 + skipped
            ),
        ));
    }
    let need = header.data_len();
    let mut raw = Vec::new();
    raw.try_reserve_exact(need).map_err(|_| {
        format_err(
            path,
            format!("cannot allocate {need} bytes for the voxel data (out of memory)"),
        )
    })?;
    (&mut src)
        .take(need as u64)
        .read_to_end(&mut raw)
        .map_err(|e| stream_err(path, e, "voxel data"))?;
    if raw.len() < need {
        if is_gzip {
            return Err(format_err(
                path,
                format!(
                    "gzip data ends after {} bytes of voxel data, but dims {:?} need {need} \
                     (file truncated?)",
                    raw.len(),
                    header.dims
                ),
            ));
        }
        header.check_data_fits(header.vox_offset as u64 + raw.len() as u64, path)?;
    }
    // parse_header checked the datatype.
    let dtype = DType::from_code(header.datatype).map_err(|m| format_err(path, m))?;
    let data = decode(&raw, dtype, header.big_endian, header.effective_scaling());
    Ok(NiftiVolume {
        dims: header.dims,
        data,
        header,
        path: path.to_path_buf(),
    })
}
