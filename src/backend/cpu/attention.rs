//! Multi-head attention with optional decomposed relative-position bias (SAM).
//!
//! `q` `[B, Lq, H*d]`, `k`/`v` `[B, Lk, H*d]`, head `h` in columns `h*d..(h+1)*d`. Per batch and
//! head: `S = scale * Q K^T + bias` (`Lq x Lk`), `P = softmax_rows(S)`, `O = P V` (`Lq x d`).
//! With a relative-position table, query `i = (qy, qx)` and key `j = (ky, kx)` get
//! `bias(i, j) = <q_i, rh[qy, ky]> + <q_i, rw[qx, kx]>` (unscaled `q`), i.e. a `kh`-vector plus a
//! `kw`-vector broadcast over the key grid: `kh + kw` dot products per query row instead of `Lk`.
//!
//! The score matrix is never materialised whole (4096^2 floats per head for SAM's global
//! attention): each task takes a block of query rows of one (batch, head), computes its scores with
//! one gemm into per-thread scratch, adds the bias, applies a vectorised softmax and multiplies by
//! V with a second gemm straight into the strided output. Tasks run in parallel on rayon; the
//! normalisation by the softmax sum is applied to the `d`-wide output rows rather than the
//! `Lk`-wide probabilities because it is cheaper.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::backend::RelPos;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::linalg::{gemm_into, Mat};
use super::{make, math, SendPtr};

/// Largest query block per task: big enough that the packed K/V panels are reused across many
/// rows, small enough that the score block (`QB x Lk`) stays in L2 for Lk = 4096.
const QB_MAX: usize = 128;

thread_local! {
    /// Per-thread score scratch, reused across calls so large attention does not page-fault on a
    /// fresh allocation every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for v in acc {
        s += v;
    }
    s
}

/// `softmax(scale * q k^T + bias) v` per batch and head.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, Tensor>>,
) -> Result<Tensor> {
    let (sq, sk, sv) = (q.shape(), k.shape(), v.shape());
    let bad = |msg: String| Error::shape("attention", msg);
    if sq.len() != 3 || sk.len() != 3 || sk != sv || sq[0] != sk[0] || sq[2] != sk[2] {
        return Err(bad(format!("q {sq:?} k {sk:?} v {sv:?}")));
    }
    let (b, lq, c) = (sq[0], sq[1], sq[2]);
    let lk = sk[1];
    if heads == 0 || c % heads != 0 {
        return Err(bad(format!("{c} channels do not split into {heads} heads")));
    }
    let d = c / heads;
    let rel = match rel {
        None => None,
        Some(r) => {
            let ((qh, qw), (kh, kw)) = (r.q_grid, r.k_grid);
            if qh * qw != lq
                || kh * kw != lk
                || r.rh.shape() != [qh, kh, d]
                || r.rw.shape() != [qw, kw, d]
            {
                return Err(bad(format!(
                    "rel-pos rh {:?} rw {:?} grids {:?}/{:?} for Lq {lq} Lk {lk} head dim {d}",
                    r.rh.shape(),
                    r.rw.shape(),
                    r.q_grid,
                    r.k_grid
                )));
            }
            Some((r.rh.data(), r.rw.data(), qw, kh, kw))
        }
    };
    let mut out = super::zeroed(b * lq * c);
    if lq == 0 || d == 0 {
        return make(out, sq);
    }
    // Even blocks: 196 rows become 2 x 98 rather than 128 + 68.
    let nblk = lq.div_ceil(QB_MAX);
    let qb = lq.div_ceil(nblk);
    let (qd, kd, vd) = (q.data(), k.data(), v.data());
    let optr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (bi, h, blk) = (t / (heads * nblk), (t / nblk) % heads, t % nblk);
        let i0 = blk * qb;
        let rows = qb.min(lq - i0);
        let q0 = (bi * lq + i0) * c + h * d;
        let kv0 = bi * lk * c + h * d;
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let need = rows * lk + rows;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (s, inv) = buf.split_at_mut(rows * lk);
            // SAFETY: Q block rows i0..i0+rows of head h (row stride c), K of batch bi read
            // transposed (k x n = d x Lk), s is rows x Lk.
            unsafe {
                gemm_into(
                    rows,
                    lk,
                    d,
                    s.as_mut_ptr(),
                    lk,
                    false,
                    Mat {
                        ptr: qd.as_ptr().add(q0),
                        rs: c as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: kd.as_ptr().add(kv0),
                        rs: 1,
                        cs: c as isize,
                    },
                    scale,
                    Parallelism::None,
                );
            }
            if let Some((rh, rw, qw, kh, kw)) = rel {
                let mut bh = super::zeroed(kh);
                let mut bw = super::zeroed(kw);
                for r in 0..rows {
                    let i = i0 + r;
                    let (qy, qx) = (i / qw, i % qw);
                    let qrow = &qd[q0 + r * c..q0 + r * c + d];
                    for (ky, o) in bh.iter_mut().enumerate() {
                        *o = dot(qrow, &rh[(qy * kh + ky) * d..(qy * kh + ky + 1) * d]);
                    }
                    for (kx, o) in bw.iter_mut().enumerate() {
                        *o = dot(qrow, &rw[(qx * kw + kx) * d..(qx * kw + kx + 1) * d]);
                    }
                    let srow = &mut s[r * lk..(r + 1) * lk];
                    for (seg, &hy) in srow.chunks_exact_mut(kw).zip(&bh) {
                        for (x, &wx) in seg.iter_mut().zip(&bw) {
                            *x += hy + wx;
                        }
                    }
                }
            }
            // An empty key set gives a zero output rather than 0/0.
            inv[..rows].fill(0.0);
            for (r, srow) in s.chunks_exact_mut(lk.max(1)).take(rows).enumerate() {
                let m = srow.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                inv[r] = 1.0 / math::exp_shift_sum(srow, m);
            }
            let o0 = (bi * lq + i0) * c + h * d;
            // SAFETY: output rows i0..i0+rows, columns h*d..(h+1)*d belong to this task only;
            // V of batch bi / head h is Lk x d with row stride c.
            unsafe {
                let dst = optr.get().add(o0);
                gemm_into(
                    rows,
                    d,
                    lk,
                    dst,
                    c,
                    false,
                    Mat {
                        ptr: s.as_ptr(),
                        rs: lk as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: vd.as_ptr().add(kv0),
                        rs: c as isize,
                        cs: 1,
                    },
                    1.0,
                    Parallelism::None,
                );
                for (r, &f) in inv[..rows].iter().enumerate() {
                    let orow = std::slice::from_raw_parts_mut(dst.add(r * c), d);
                    for x in orow {
                        *x *= f;
                    }
                }
            }
        });
    };
    let ntask = b * heads * nblk;
    if b * heads * lq * lk * d >= (1 << 18) {
        (0..ntask).into_par_iter().for_each(task);
    } else {
        (0..ntask).for_each(task);
    }
    make(out, sq)
}
