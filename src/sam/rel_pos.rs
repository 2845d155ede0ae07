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

/// Adjoint of [`resize_linear`]: the gradient of a `[l, d]` table given the gradient `dr`
/// `[m, d]` of its resampled rows.
pub fn resize_linear_backward(dr: &Tensor, l: usize) -> Result<Tensor> {
    if dr.rank() != 2 || l == 0 {
        return Err(Error::shape(
            "rel_pos::resize_linear_backward",
            format!("gradient {:?} -> {l} rows", dr.shape()),
        ));
    }
    let (m, d) = (dr.dim(0), dr.dim(1));
    if l == m {
        return Ok(dr.clone());
    }
    let scale = l as f32 / m as f32;
    let mut out = vec![0f32; l * d];
    for (i, g) in dr.data().chunks_exact(d).enumerate() {
        // Same sample positions as the forward, so the weights are its transpose.
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x.floor() as usize).min(l - 1);
        let i1 = (i0 + 1).min(l - 1);
        let t = x - i0 as f32;
        for c in 0..d {
            out[i0 * d + c] += (1.0 - t) * g[c];
            out[i1 * d + c] += t * g[c];
        }
    }
    Tensor::from_vec(out, &[l, d])
}

/// Adjoint of [`gather`]: the gradient of a `[l, d]` table given the gradient `dg` `[q, k, d]`
/// of the gathered embeddings (rows used by several query/key pairs add up).
pub fn gather_backward(dg: &Tensor, l: usize, q: usize, k: usize) -> Result<Tensor> {
    if dg.rank() != 3 || dg.dim(0) != q || dg.dim(1) != k {
        return Err(Error::shape(
            "rel_pos::gather_backward",
            format!("gradient {:?} for a {q}x{k} gather", dg.shape()),
        ));
    }
    let d = dg.dim(2);
    let m = 2 * q.max(k) - 1;
    let qs = (k as f32 / q as f32).max(1.0);
    let ks = (q as f32 / k as f32).max(1.0);
    let mut dr = vec![0f32; m * d];
    let src = dg.data();
    for i in 0..q {
        for j in 0..k {
            let r = (i as f32 * qs - j as f32 * ks) + (k as f32 - 1.0) * ks;
            let r = (r as i64).clamp(0, m as i64 - 1) as usize;
            let g = &src[(i * k + j) * d..(i * k + j + 1) * d];
            for (o, v) in dr[r * d..r * d + d].iter_mut().zip(g) {
                *o += v;
            }
        }
    }
    resize_linear_backward(&Tensor::from_vec(dr, &[m, d])?, l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_backward_is_the_adjoint() {
        // <gather(t), g> == <t, gather_backward(g)> for a resampled, non-square gather.
        let mut rng = crate::sam::random::Rng::new(3);
        let t = rng.tensor(&[9, 4], 1.0);
        let (q, k) = (3, 7);
        let g = rng.tensor(&[q, k, 4], 1.0);
        let fwd = gather(&t, q, k).unwrap();
        let lhs: f64 = fwd
            .data()
            .iter()
            .zip(g.data())
            .map(|(a, b)| (a * b) as f64)
            .sum();
        let bt = gather_backward(&g, 9, q, k).unwrap();
        let rhs: f64 = t
            .data()
            .iter()
            .zip(bt.data())
            .map(|(a, b)| (a * b) as f64)
            .sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn gather_same_size_indexes_offsets() {
        // Table rows are their own offset index, so the gather must give i - j + (k - 1).
        let t = Tensor::from_vec((0..5).map(|x| x as f32).collect(), &[5, 1]).unwrap();
        let g = gather(&t, 3, 3).unwrap();
        assert_eq!(g.data(), &[2., 1., 0., 3., 2., 1., 4., 3., 2.]);
    }

    #[test]
    fn gather_on_equal_sides_is_shift_invariant() {
        // What `RelPos::shift_invariant` promises for the model's tables: entry (i, j) depends on
        // i - j only, with the table at its native length and resampled (SAM at another input
        // size, the depth branch on a small grid).
        let mut rng = crate::sam::random::Rng::new(5);
        for (l, side) in [(27, 14), (127, 14), (27, 3), (1, 1), (9, 64)] {
            let d = 3;
            let g = gather(&rng.tensor(&[l, d], 1.0), side, side).unwrap();
            let at = |i: usize, j: usize| &g.data()[(i * side + j) * d..(i * side + j + 1) * d];
            for i in 1..side {
                for j in 1..side {
                    assert_eq!(
                        at(i, j),
                        at(i - 1, j - 1),
                        "table {l}, side {side}, ({i}, {j})"
                    );
                }
            }
        }
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
