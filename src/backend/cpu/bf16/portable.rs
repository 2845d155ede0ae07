//! The portable register tile: the packed loop of the AVX512-BF16 kernel in plain Rust, with
//! the same arithmetic step by step ([`super::step`]: odd element first, the exact product added
//! with one rounding, then flushed), so its results are bit-identical to the instruction's.

use super::{from_bf16, step, Tile, MR, NR};

/// # Safety
/// The panels must hold `kp` pairs and `tile` describe writable memory.
pub(super) unsafe fn micro(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kp {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        let mut b_even = [0.0f32; NR];
        let mut b_odd = [0.0f32; NR];
        for j in 0..NR {
            b_even[j] = from_bf16(bp[j] as u16);
            b_odd[j] = from_bf16((bp[j] >> 16) as u16);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let pa = *a.add(i * kp + p);
            let (a_even, a_odd) = (from_bf16(pa as u16), from_bf16((pa >> 16) as u16));
            for j in 0..NR {
                row[j] = step(step(row[j], a_odd, b_odd[j]), a_even, b_even[j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(tile.rows) {
        let d = std::slice::from_raw_parts_mut(tile.dst.add(i * tile.rs), tile.cols);
        for (y, &v) in d.iter_mut().zip(row) {
            *y = if tile.accumulate {
                *y + tile.scale * v
            } else {
                tile.scale * v
            };
        }
    }
}
