//! The zip container of a checkpoint: the central directory (ZIP64 included) read into a
//! name-to-entry map, and the bytes of a STORED entry.

use std::collections::HashMap;
use std::path::Path;

use crate::error::Result;

use super::err;

/// One archive member: where its data lies.
pub(super) struct Entry {
    /// Offset of the local file header.
    local: u64,
    /// Stored size.
    size: u64,
    /// Compression method (0 = STORED).
    method: u16,
    /// General-purpose flags (bit 0: encrypted).
    flags: u16,
}

fn rd_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn rd_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn rd_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

pub(super) fn zip_entries(path: &Path, b: &[u8]) -> Result<HashMap<String, Entry>> {
    let bad = |what: &str| err(path, format!("truncated or corrupt zip archive: {what}"));
    // End of central directory: 22 bytes plus a comment of up to 64 KiB, searched backwards.
    const EOCD: u32 = 0x0605_4b50;
    if b.len() < 22 {
        return Err(bad("shorter than an end-of-central-directory record"));
    }
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..=b.len() - 22)
        .rev()
        .find(|&i| rd_u32(b, i) == Some(EOCD))
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let mut count = rd_u16(b, eocd + 10).ok_or_else(|| bad("EOCD"))? as u64;
    let mut cd_size = rd_u32(b, eocd + 12).ok_or_else(|| bad("EOCD"))? as u64;
    let mut cd_off = rd_u32(b, eocd + 16).ok_or_else(|| bad("EOCD"))? as u64;
    if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        // ZIP64: a locator right before the EOCD points at the ZIP64 EOCD record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| rd_u32(b, l) == Some(0x0706_4b50))
            .ok_or_else(|| bad("ZIP64 end-of-central-directory locator missing"))?;
        let z = rd_u64(b, loc + 8).ok_or_else(|| bad("ZIP64 locator"))?;
        let z = usize::try_from(z)
            .ok()
            .filter(|&z| rd_u32(b, z) == Some(0x0606_4b50))
            .ok_or_else(|| bad("ZIP64 end-of-central-directory record missing"))?;
        count = rd_u64(b, z + 32).ok_or_else(|| bad("ZIP64 EOCD"))?;
        cd_size = rd_u64(b, z + 40).ok_or_else(|| bad("ZIP64 EOCD"))?;
        cd_off = rd_u64(b, z + 48).ok_or_else(|| bad("ZIP64 EOCD"))?;
    }
    let cd_start = usize::try_from(cd_off).map_err(|_| bad("central directory offset"))?;
    let cd_end = usize::try_from(cd_size)
        .ok()
        .and_then(|s| cd_start.checked_add(s))
        .filter(|&e| e <= b.len())
        .ok_or_else(|| bad("central directory runs past the end of the file"))?;
    let mut out = HashMap::new();
    let mut p = cd_start;
    for _ in 0..count {
        if p + 46 > cd_end || rd_u32(b, p) != Some(0x0201_4b50) {
            return Err(bad("central directory entry"));
        }
        let r16 = |o| rd_u16(b, p + o).unwrap_or(0);
        let r32 = |o| rd_u32(b, p + o).unwrap_or(0);
        let flags = r16(8);
        let method = r16(10);
        let mut csize = r32(20) as u64;
        let mut usize_ = r32(24) as u64;
        let (nlen, xlen, clen) = (r16(28) as usize, r16(30) as usize, r16(32) as usize);
        let mut local = r32(42) as u64;
        let name_end = p + 46 + nlen;
        let next = name_end + xlen + clen;
        if next > cd_end {
            return Err(bad("central directory entry runs past the directory"));
        }
        let name = String::from_utf8_lossy(&b[p + 46..name_end]).into_owned();
        // ZIP64 extended information: the 64-bit values of the fields set to all ones, in order.
        let mut x = name_end;
        while x + 4 <= name_end + xlen {
            let (id, len) = (r16(x - p) as usize, r16(x + 2 - p) as usize);
            let body = x + 4;
            if body + len > name_end + xlen {
                return Err(bad("extra field"));
            }
            if id == 1 {
                let mut q = body;
                let mut take = |v: &mut u64| -> Result<()> {
                    if *v == 0xFFFF_FFFF {
                        if q + 8 > body + len {
                            return Err(bad("ZIP64 extra field"));
                        }
                        *v = rd_u64(b, q).unwrap_or(0);
                        q += 8;
                    }
                    Ok(())
                };
                take(&mut usize_)?;
                take(&mut csize)?;
                take(&mut local)?;
            }
            x = body + len;
        }
        out.insert(
            name,
            Entry {
                local,
                size: if method == 0 {
                    csize.max(usize_)
                } else {
                    csize
                },
                method,
                flags,
            },
        );
        p = next;
    }
    Ok(out)
}

/// The bytes of a STORED entry.
pub(super) fn entry_data<'b>(path: &Path, b: &'b [u8], e: &Entry, name: &str) -> Result<&'b [u8]> {
    if e.flags & 1 != 0 {
        return Err(err(path, format!("zip entry `{name}` is encrypted")));
    }
    if e.method != 0 {
        return Err(err(
            path,
            format!(
                "zip entry `{name}` is compressed (method {}): torch.save writes uncompressed \
                 entries; re-save the checkpoint with torch.save",
                e.method
            ),
        ));
    }
    let bad = || {
        err(
            path,
            format!("truncated or corrupt zip archive: entry `{name}` lies outside the file"),
        )
    };
    let l = usize::try_from(e.local).map_err(|_| bad())?;
    if rd_u32(b, l) != Some(0x0403_4b50) {
        return Err(bad());
    }
    let nlen = rd_u16(b, l + 26).ok_or_else(bad)? as usize;
    let xlen = rd_u16(b, l + 28).ok_or_else(bad)? as usize;
    let start = l + 30 + nlen + xlen;
    let end = usize::try_from(e.size)
        .ok()
        .and_then(|s| start.checked_add(s))
        .filter(|&end| end <= b.len())
        .ok_or_else(bad)?;
    Ok(&b[start..end])
}
