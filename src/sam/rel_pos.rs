//! Relative-position tables: SAM's `get_rel_pos`, on the host.
//!
//! A table of length `L` and width `d` covers offsets `-(S-1)..=(S-1)` for a grid side `S`.
//! For a query side `q` and key side `k` we need `M = 2*max(q,k)-1` rows: when `L != M` the
//! table is first resampled linearly to `M` rows (PyTorch `F.interpolate(mode="linear",
//! align_corners=False)` along the table axis), then row `i - j + (k-1)` (scaled when `q != k`) is
//! gathered for every query/key pair, giving `[q, k, d]`. This is how SAM runs at input sizes
//! other than its native one, and how the SD-Trans depth branch reuses a block's tables on the
//! small depth grid.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Linear resampling of `table` `[L, d]` to `[m, d]`, PyTorch's align_corners=False rule.
pub fn resize_linear(table: &Tensor, m: usize) -> Result<Tensor> {
    if table.rank() != 2 || table.dim(0) == 0 || m == 0 {
        return Err(Error::shape(
            "rel_pos::resize_linear",
            format!("table {:?} -> {m}", table.shape()),
        ));
    }
    let (l, d) = (table.dim(0), table.dim(1));
    if l == m {
        return Ok(table.clone());
    }
    let src = table.data();
    let scale = l as f32 / m as f32;
    let mut out = vec![0f32; m * d];
    for (i, row) in out.chunks_exact_mut(d).enumerate() {
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x.floor() as usize).min(l - 1);
        let i1 = (i0 + 1).min(l - 1);
        let t = x - i0 as f32;
        let (a, b) = (&src[i0 * d..i0 * d + d], &src[i1 * d..i1 * d + d]);
        for c in 0..d {
            row[c] = (1.0 - t) * a[c] + t * b[c];
        }
    }
    Tensor::from_vec(out, &[m, d])
}

/// Gathers the `[q, k, d]` relative-position embeddings for query side `q` and key side `k`.
pub fn gather(table: &Tensor, q: usize, k: usize) -> Result<Tensor> {
    let m = 2 * q.max(k) - 1;
    let t = resize_linear(table, m)?;
    let d = t.dim(1);
    let qs = (k as f32 / q as f32).max(1.0);
    let ks = (q as f32 / k as f32).max(1.0);
    let mut out = vec![0f32; q * k * d];
    for i in 0..q {
        for j in 0..k {
            let r = (i as f32 * qs - j as f32 * ks) + (k as f32 - 1.0) * ks;
            let r = (r as i64).clamp(0, m as i64 - 1) as usize;
            out[(i * k + j) * d..(i * k + j + 1) * d].copy_from_slice(&t.data()[r * d..r * d + d]);
        }
    }
    Tensor::from_vec(out, &[q, k, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_same_size_indexes_offsets() {
        // Table rows are their own offset index, so the gather must give i - j + (k - 1).
        let t = Tensor::from_vec((0..5).map(|x| x as f32).collect(), &[5, 1]).unwrap();
        let g = gather(&t, 3, 3).unwrap();
        assert_eq!(g.data(), &[2., 1., 0., 3., 2., 1., 4., 3., 2.]);
    }

    #[test]
    fn resize_linear_matches_pytorch_rule() {
        // F.interpolate([0, 1, 2], size=5, mode="linear") = [0, 0.4, 1, 1.6, 2].
        let t = Tensor::from_vec(vec![0., 1., 2.], &[3, 1]).unwrap();
        let r = resize_linear(&t, 5).unwrap();
        let want = [0.0, 0.4, 1.0, 1.6, 2.0];
        for (a, b) in r.data().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", r.data());
        }
    }
}
