//! The AVX512-BF16 register tile: `MR x NR` = 12 x 32 outputs in 24 zmm accumulators.
//!
//! Per reduction pair: two 16-lane loads of the B panel, then for each of the 12 rows one
//! broadcast A pair (the A panel is row-major, `[MR][kp]`) and two `vdpbf16ps`. The epilogue multiplies by the scale and adds the old
//! output as separate roundings (as [`super::reference`] does), with masked loads and stores on
//! a partial last panel.

use super::{Tile, MR, NR};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// # Safety
/// The CPU must have AVX512F and AVX512-BF16 ([`super::Bf16Kernel::detect`] chose this kernel);
/// the panels must hold `kp` pairs and `tile` describe writable memory.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn micro(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    micro_impl(kp, a, b, tile)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_impl(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let bp = b.add(p * NR) as *const __m512i;
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
        let ap = a.add(p);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i * kp) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    let scale = _mm512_set1_ps(tile.scale);
    let masks: [__mmask16; 2] = if tile.cols >= NR {
        [0xffff, 0xffff]
    } else {
        let m = (1u32 << tile.cols) - 1;
        [(m & 0xffff) as u16, (m >> 16) as u16]
    };
    for (i, row) in acc.iter().enumerate().take(tile.rows) {
        let d = tile.dst.add(i * tile.rs);
        for (h, (&v, &mask)) in row.iter().zip(&masks).enumerate() {
            if mask == 0 {
                continue;
            }
            let dh = d.add(16 * h);
            let mut y = _mm512_mul_ps(v, scale);
            if tile.accumulate {
                y = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dh), y);
            }
            _mm512_mask_storeu_ps(dh, mask, y);
        }
    }
}

/// Converts `src` (contiguous f32) to bf16 pairs in `out` as [`super::to_bf16`] does, 32
/// values (16 pairs) at a time; returns how many pairs it wrote (the caller does the rest).
///
/// # Safety
/// The CPU must have AVX512F and AVX512BW (implied by AVX512-BF16 on every CPU that has it);
/// `out` must hold `src.len() / 2` pairs.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn convert_pairs(src: &[f32], out: &mut [u32]) -> usize {
    convert_impl(src, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_impl(src: &[f32], out: &mut [u32]) -> usize {
    let blocks = src.len() / 32;
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let inf = _mm512_set1_epi32(0x7f80_0000);
    let one = _mm512_set1_epi32(1);
    let half = _mm512_set1_epi32(0x7fff);
    let quiet = _mm512_set1_epi32(0x40);
    let exp = _mm512_set1_epi32(0x7f80);
    let sign = _mm512_set1_epi32(0x8000);
    let cvt = |x: __m512i| -> __m256i {
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), one);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, _mm512_add_epi32(half, lsb)));
        let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs), inf);
        let quieted = _mm512_or_si512(_mm512_srli_epi32::<16>(x), quiet);
        let h = _mm512_mask_blend_epi32(nan, rounded, quieted);
        let sub = _mm512_testn_epi32_mask(h, exp);
        let h = _mm512_mask_blend_epi32(sub, h, _mm512_and_si512(h, sign));
        _mm512_cvtepi32_epi16(h)
    };
    for blk in 0..blocks {
        let s = src.as_ptr().add(32 * blk);
        let lo = cvt(_mm512_castps_si512(_mm512_loadu_ps(s)));
        let hi = cvt(_mm512_castps_si512(_mm512_loadu_ps(s.add(16))));
        let d = out.as_mut_ptr().add(16 * blk) as *mut __m256i;
        _mm256_storeu_si256(d, lo);
        _mm256_storeu_si256(d.add(1), hi);
    }
    blocks * 16
}

/// Never chosen off x86-64 ([`super::Bf16Kernel::detect`] returns `Portable` there).
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn micro(kp: usize, a: *const u32, b: *const u32, tile: Tile) {
    super::portable::micro(kp, a, b, tile)
}

/// Never chosen off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn convert_pairs(_src: &[f32], _out: &mut [u32]) -> usize {
    0
}
