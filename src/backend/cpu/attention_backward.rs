//! Backward of the attention op (see `backward` for the other ops and the determinism rule).
//!
//! Per (batch, head), query blocks of at most `QB_MAX` rows recompute
//! `P = softmax(scale Q K^T + bias)`; then `dV += P^T dO`, `dP = dO V^T`,
//! `dS = P (dP - rowsum(dO o))`, `dQ = scale dS K + rel terms`, `dK += scale dS^T Q`. The bias
//! `<q, rh[qy, ky]> + <q, rw[qx, kx]>` sends `sum_kx dS` and `sum_ky dS` back to `q` (through the
//! tables) and to the tables (through `q`). Each task owns whole columns of `dq`, `dk` and `dv`
//! (one batch and head), so those need no reduction; the tables' gradients add per-task partial
//! sums in task order.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::backend::{AttentionGrads, RelPos};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::backward::{axpy, cols_of, rows_of, sum_zip};
use super::linalg::gemm_into;
use super::math::{self, madd};
use super::{make, zeroed, SendPtr};

/// Most query rows per block. Each thread holds two `QB x Lk` buffers (probabilities and score
/// gradients, 4 MB at SAM's global Lk = 4096); every block re-reads and re-writes the `Lk x d`
/// dK/dV accumulators and re-packs K and V inside gemm, so larger blocks amortise that traffic.
/// 128 is the forward's measured optimum; on a loaded 2-core machine 64, 128 and 256 were within
/// noise of each other for SAM's global (4096 tokens) and windowed (14x14) attention.
const QB_MAX: usize = 128;

/// Most groups of (batch, head) tasks when relative-position tables are trained. Each group sums
/// its tasks' table gradients into one partial buffer (up to 2 MB for global attention), so the
/// group count bounds that memory while leaving enough tasks to balance the threads; it depends
/// on the shapes only, which keeps the final ordered sum thread-count independent.
const REL_GROUPS: usize = 16;

thread_local! {
    /// Per-thread scratch, reused across calls so large attention does not page-fault on a fresh
    /// allocation every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The relative-position tables of one call.
struct RelGrid<'a> {
    /// `[qh, kh, d]`.
    rh: &'a [f32],
    /// `[qw, kw, d]`.
    rw: &'a [f32],
    qw: usize,
    kh: usize,
    kw: usize,
}

/// One query block of one (batch, head): contiguous `rows x d` queries, the first query index,
/// the key count and the tables if any.
struct Blk<'a> {
    q: &'a [f32],
    d: usize,
    i0: usize,
    lk: usize,
    rel: Option<&'a RelGrid<'a>>,
}

/// `<a, b>` with 16 lanes of (fused) multiply-adds.
#[inline(always)]
fn dot<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] = madd::<F>(x[i], y[i], acc[i]);
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

/// In place on the block's scaled scores `s` (`rows x Lk`): add the bias and turn each row into
/// probabilities. `bw` is `kw` floats of scratch.
#[inline(always)]
fn probs_body<const F: bool>(blk: &Blk<'_>, s: &mut [f32], bw: &mut [f32]) {
    let (d, lk) = (blk.d, blk.lk);
    for (r, row) in s.chunks_exact_mut(lk).enumerate() {
        if let Some(rel) = blk.rel {
            let i = blk.i0 + r;
            let (qy, qx) = (i / rel.qw, i % rel.qw);
            let qr = &blk.q[r * d..(r + 1) * d];
            let tw = &rel.rw[qx * rel.kw * d..(qx + 1) * rel.kw * d];
            for (b, t) in bw.iter_mut().zip(tw.chunks_exact(d)) {
                *b = dot::<F>(qr, t);
            }
            let th = &rel.rh[qy * rel.kh * d..(qy + 1) * rel.kh * d];
            for (seg, t) in row.chunks_exact_mut(rel.kw).zip(th.chunks_exact(d)) {
                let hy = dot::<F>(qr, t);
                for (x, &wx) in seg.iter_mut().zip(bw.iter()) {
                    *x += hy + wx;
                }
            }
        }
        let m = math::max(row);
        for x in row.iter_mut() {
            *x = math::exp1::<F>(*x - m);
        }
        let inv = 1.0 / math::sum16(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

math::dispatch!(
    /// See [`probs_body`].
    fn probs(blk: &Blk<'_>, s: &mut [f32], bw: &mut [f32]) -> (),
    probs_body
);

/// Score gradients in place and the bias terms: on entry `ds` holds `dP = dO V^T`, on exit
/// `dS = P (dP - dr)`. `dq` (`rows x d`) receives the bias part of the query gradient (zero
/// without tables), to which the caller's GEMM adds `scale dS K`; `part` (`[drh | drw]`)
/// accumulates the table gradients. `sw` is `kw` floats of scratch.
#[inline(always)]
fn dscores_body<const F: bool>(
    blk: &Blk<'_>,
    p: &[f32],
    ds: &mut [f32],
    dr: &[f32],
    dq: &mut [f32],
    sw: &mut [f32],
    part: &mut [f32],
) {
    let (d, lk) = (blk.d, blk.lk);
    for (r, (prow, grow)) in p.chunks_exact(lk).zip(ds.chunks_exact_mut(lk)).enumerate() {
        let dri = dr[r];
        for (g, &pv) in grow.iter_mut().zip(prow) {
            *g = pv * (*g - dri);
        }
        let dqr = &mut dq[r * d..(r + 1) * d];
        dqr.fill(0.0);
        let Some(rel) = blk.rel else { continue };
        let i = blk.i0 + r;
        let (qy, qx) = (i / rel.qw, i % rel.qw);
        let qr = &blk.q[r * d..(r + 1) * d];
        let (drh, drw) = part.split_at_mut(rel.rh.len());
        // d bias / d q = rh[qy, ky] + rw[qx, kx], so q collects the table rows weighted by the
        // row's key-row sums (sh) and key-column sums (sw) of dS, and the tables collect q.
        sw.fill(0.0);
        for (ky, seg) in grow.chunks_exact(rel.kw).enumerate() {
            let sh = math::sum16(seg);
            for (a, &v) in sw.iter_mut().zip(seg) {
                *a += v;
            }
            let at = (qy * rel.kh + ky) * d;
            axpy::<F>(sh, &rel.rh[at..at + d], dqr);
            axpy::<F>(sh, qr, &mut drh[at..at + d]);
        }
        for (kx, &s) in sw.iter().enumerate() {
            let at = (qx * rel.kw + kx) * d;
            axpy::<F>(s, &rel.rw[at..at + d], dqr);
            axpy::<F>(s, qr, &mut drw[at..at + d]);
        }
    }
}

math::dispatch!(
    /// See [`dscores_body`].
    fn dscores(
        blk: &Blk<'_>,
        p: &[f32],
        ds: &mut [f32],
        dr: &[f32],
        dq: &mut [f32],
        sw: &mut [f32],
        part: &mut [f32]
    ) -> (),
    dscores_body
);

/// Gradients of `softmax(scale q k^T + bias) v` per batch and head.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, Tensor>>,
) -> Result<AttentionGrads<Tensor>> {
    let (sq, sk, sv) = (q.shape(), k.shape(), v.shape());
    let bad = |msg: String| Error::shape("attention_backward", msg);
    if sq.len() != 3
        || sk.len() != 3
        || sk != sv
        || sq[0] != sk[0]
        || sq[2] != sk[2]
        || o.shape() != sq
        || d_o.shape() != sq
    {
        return Err(bad(format!(
            "q {sq:?} k {sk:?} v {sv:?} o {:?} d_o {:?}",
            o.shape(),
            d_o.shape()
        )));
    }
    let (b, lq, c) = (sq[0], sq[1], sq[2]);
    let lk = sk[1];
    if heads == 0 || c % heads != 0 {
        return Err(bad(format!("{c} channels do not split into {heads} heads")));
    }
    let d = c / heads;
    let grid = match &rel {
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
            Some(RelGrid {
                rh: r.rh.data(),
                rw: r.rw.data(),
                qw,
                kh,
                kw,
            })
        }
    };
    let rel_len = grid.as_ref().map_or(0, |g| g.rh.len() + g.rw.len());
    let mut dq = zeroed(b * lq * c);
    let mut dk = zeroed(b * lk * c);
    let mut dv = zeroed(b * lk * c);
    let mut drel = vec![0.0f32; rel_len];
    if lq > 0 && lk > 0 && d > 0 {
        // Even blocks: 196 rows become 2 x 98 rather than 128 + 68.
        let nblk = lq.div_ceil(QB_MAX);
        let qb = lq.div_ceil(nblk);
        let ntask = b * heads;
        // Without tables there is nothing to reduce: one group per task.
        let per = if grid.is_some() {
            ntask.div_ceil(REL_GROUPS)
        } else {
            1
        };
        let ngroups = ntask.div_ceil(per);
        let (qd, kd, vd, od, dod) = (q.data(), k.data(), v.data(), o.data(), d_o.data());
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        let kw_len = grid.as_ref().map_or(0, |g| g.kw);
        let panel = lk * d;
        // One (batch, head): all its query blocks in order, accumulating dK and dV in contiguous
        // panels that are scattered into the outputs at the end.
        let task = |t: usize, part: &mut [f32], buf: &mut Vec<f32>| {
            let (bi, h) = (t / heads, t % heads);
            let need = 4 * panel + 2 * qb * lk + 3 * qb * d + qb + kw_len;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (kp, rest) = buf.split_at_mut(panel);
            let (vp, rest) = rest.split_at_mut(panel);
            let (dkp, rest) = rest.split_at_mut(panel);
            let (dvp, rest) = rest.split_at_mut(panel);
            let (s, rest) = rest.split_at_mut(qb * lk);
            let (ds, rest) = rest.split_at_mut(qb * lk);
            let (qblk, rest) = rest.split_at_mut(qb * d);
            let (doblk, rest) = rest.split_at_mut(qb * d);
            let (dqblk, rest) = rest.split_at_mut(qb * d);
            let (dr, rest) = rest.split_at_mut(qb);
            let sw = &mut rest[..kw_len];
            // K and V of this head, contiguous (head slices with row stride H*d measured ~25%
            // slower as gemm operands in the forward).
            for j in 0..lk {
                let at = (bi * lk + j) * c + h * d;
                kp[j * d..(j + 1) * d].copy_from_slice(&kd[at..at + d]);
                vp[j * d..(j + 1) * d].copy_from_slice(&vd[at..at + d]);
            }
            for blk_i in 0..nblk {
                let i0 = blk_i * qb;
                let rows = qb.min(lq - i0);
                let first = blk_i == 0;
                let (s, ds) = (&mut s[..rows * lk], &mut ds[..rows * lk]);
                let (qblk, doblk) = (&mut qblk[..rows * d], &mut doblk[..rows * d]);
                let (dqblk, dr) = (&mut dqblk[..rows * d], &mut dr[..rows]);
                for r in 0..rows {
                    let at = (bi * lq + i0 + r) * c + h * d;
                    qblk[r * d..(r + 1) * d].copy_from_slice(&qd[at..at + d]);
                    doblk[r * d..(r + 1) * d].copy_from_slice(&dod[at..at + d]);
                    // D_i = <dO_i, O_i> = sum_j P_ij dP_ij, the softmax Jacobian's row term.
                    dr[r] = sum_zip(&dod[at..at + d], &od[at..at + d], |x, y| x * y);
                }
                let blk = Blk {
                    q: qblk,
                    d,
                    i0,
                    lk,
                    rel: grid.as_ref(),
                };
                // SAFETY (all gemm calls below): every operand is a live contiguous buffer of
                // exactly the described extent (rows x d blocks, Lk x d panels, rows x Lk score
                // blocks), and no destination aliases an operand.
                unsafe {
                    // S = scale Q K^T.
                    gemm_into(
                        rows,
                        lk,
                        d,
                        s.as_mut_ptr(),
                        lk,
                        false,
                        rows_of(blk.q.as_ptr(), d),
                        cols_of(kp.as_ptr(), d),
                        scale,
                        Parallelism::None,
                    );
                }
                probs(&blk, s, sw);
                unsafe {
                    // dP = dO V^T.
                    gemm_into(
                        rows,
                        lk,
                        d,
                        ds.as_mut_ptr(),
                        lk,
                        false,
                        rows_of(doblk.as_ptr(), d),
                        cols_of(vp.as_ptr(), d),
                        1.0,
                        Parallelism::None,
                    );
                    // dV += P^T dO.
                    gemm_into(
                        lk,
                        d,
                        rows,
                        dvp.as_mut_ptr(),
                        d,
                        !first,
                        cols_of(s.as_ptr(), lk),
                        rows_of(doblk.as_ptr(), d),
                        1.0,
                        Parallelism::None,
                    );
                }
                dscores(&blk, s, ds, dr, dqblk, sw, part);
                unsafe {
                    // dQ = bias part + scale dS K.
                    gemm_into(
                        rows,
                        d,
                        lk,
                        dqblk.as_mut_ptr(),
                        d,
                        true,
                        rows_of(ds.as_ptr(), lk),
                        rows_of(kp.as_ptr(), d),
                        scale,
                        Parallelism::None,
                    );
                    // dK += scale dS^T Q.
                    gemm_into(
                        lk,
                        d,
                        rows,
                        dkp.as_mut_ptr(),
                        d,
                        !first,
                        cols_of(ds.as_ptr(), lk),
                        rows_of(blk.q.as_ptr(), d),
                        scale,
                        Parallelism::None,
                    );
                }
                for r in 0..rows {
                    let at = (bi * lq + i0 + r) * c + h * d;
                    // SAFETY: columns h*d..(h+1)*d of batch bi's rows belong to this task only,
                    // and at + d <= b * lq * c.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            dqblk[r * d..].as_ptr(),
                            dq_ptr.get().add(at),
                            d,
                        );
                    }
                }
            }
            for j in 0..lk {
                let at = (bi * lk + j) * c + h * d;
                // SAFETY: as for dq, this task's columns of batch bi; at + d <= b * lk * c.
                unsafe {
                    std::ptr::copy_nonoverlapping(dkp[j * d..].as_ptr(), dk_ptr.get().add(at), d);
                    std::ptr::copy_nonoverlapping(dvp[j * d..].as_ptr(), dv_ptr.get().add(at), d);
                }
            }
        };
        let group = |g: usize| {
            let mut part = vec![0.0f32; rel_len];
            SCRATCH.with(|cell| {
                let mut buf = cell.borrow_mut();
                for t in g * per..((g + 1) * per).min(ntask) {
                    task(t, &mut part, &mut buf);
                }
            });
            part
        };
        let parts: Vec<Vec<f32>> = if b * heads * lq * lk * d >= (1 << 18) {
            (0..ngroups).into_par_iter().map(group).collect()
        } else {
            (0..ngroups).map(group).collect()
        };
        for p in &parts {
            for (o, &x) in drel.iter_mut().zip(p) {
                *o += x;
            }
        }
    }
    let drel = match (&rel, grid.as_ref()) {
        (Some(r), Some(g)) => {
            let dw = drel.split_off(g.rh.len());
            Some((make(drel, r.rh.shape())?, make(dw, r.rw.shape())?))
        }
        _ => None,
    };
    Ok(AttentionGrads {
        dq: make(dq, sq)?,
        dk: make(dk, sk)?,
        dv: make(dv, sk)?,
        drel,
    })
}
