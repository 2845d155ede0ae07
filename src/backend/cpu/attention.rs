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
//! `Lk`-wide probabilities because it is cheaper. The per-block bias + softmax is one
//! runtime-dispatched kernel (AVX-512 / AVX2+FMA / portable) because the crate itself is built
//! for baseline x86-64 and that loop is a fifth of the attention time.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::backend::RelPos;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::bf16::{gemm_packed, pack_b_into, packed_len, PackedB, Prec};
use super::linalg::{product, Mat};
use super::{make, math, SendPtr};

/// Largest query block per task: big enough that gemm's packed K/V panels are reused across many
/// rows, small enough that the score block (`QB x Lk`, 2 MB at Lk = 4096) stays near L2.
/// Measured on SAM's global attention (4096 tokens, 12 heads, d = 64): 64 and 256 were 10-25%
/// slower than 128.
const QB_MAX: usize = 128;

thread_local! {
    /// Per-thread score scratch, reused across calls so large attention does not page-fault on a
    /// fresh allocation every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `<a, b>` with 16 lanes of fused multiply-adds.
#[inline(always)]
fn dot<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] = math::madd::<F>(x[i], y[i], acc[i]);
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

/// `out[k] = sum_c q[c] * t[c, k]` for a `[d, K]` table `t`.
#[inline(always)]
fn axpy_rows<const F: bool>(q: &[f32], t: &[f32], out: &mut [f32]) {
    let k = out.len();
    out.fill(0.0);
    for (c, &qc) in q.iter().enumerate() {
        for (o, &tv) in out.iter_mut().zip(&t[c * k..(c + 1) * k]) {
            *o = math::madd::<F>(qc, tv, *o);
        }
    }
}

/// `out[k] = <q, t[k, :]>` for one query row against a table slice; `t` is the table as given
/// (`[K, d]`) and `tt` the same slice transposed (`[d, K]`). Wide tables (global attention,
/// K = 64) use the transposed form: accumulating `q[c] * tt[c, :]` is a vector axpy over keys,
/// where per-key dot products would each end in a horizontal reduction. Narrow ones (windows,
/// K = 14) would leave the axpy mostly in its scalar remainder, so they take the dot products.
#[inline(always)]
fn table_bias<const F: bool>(q: &[f32], t: &[f32], tt: &[f32], out: &mut [f32]) {
    let (k, d) = (out.len(), q.len());
    if k >= 16 {
        axpy_rows::<F>(q, &tt[..d * k], out);
    } else {
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot::<F>(q, &t[j * d..(j + 1) * d]);
        }
    }
}

/// `[a, b, d]` -> `[a, d, b]` (the relative-position tables, so each query's bias is an axpy).
fn transpose_table(t: &[f32], a: usize, b: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; a * b * d];
    for i in 0..a {
        for j in 0..b {
            for c in 0..d {
                out[(i * d + c) * b + j] = t[(i * b + j) * d + c];
            }
        }
    }
    out
}

/// One query block's softmax inputs: the contiguous `rows x d` queries, the block's first query
/// index, the key count and the relative-position tables if any.
struct Block<'a> {
    q: &'a [f32],
    d: usize,
    i0: usize,
    lk: usize,
    rel: Option<&'a Rel<'a>>,
}

/// The relative-position tables of one call, as given and transposed.
struct Rel<'a> {
    /// `[qh, kh, d]`.
    rh: &'a [f32],
    /// `[qw, kw, d]`.
    rw: &'a [f32],
    /// `[qh, d, kh]`.
    rh_t: Vec<f32>,
    /// `[qw, d, kw]`.
    rw_t: Vec<f32>,
    qw: usize,
    kh: usize,
    kw: usize,
}

/// In place on the block's `rows x Lk` scaled scores: add the relative-position bias, then
/// `s = exp(s - rowmax)`, storing `1 / rowsum` in `inv` (0 for an empty key set).
#[inline(always)]
fn softmax_block_body<const F: bool>(blk: &Block<'_>, s: &mut [f32], inv: &mut [f32]) {
    let (d, lk) = (blk.d, blk.lk);
    let mut tables = blk.rel.map(|r| (vec![0.0f32; r.kh], vec![0.0f32; r.kw]));
    for (r, iv) in inv.iter_mut().enumerate() {
        let srow = &mut s[r * lk..(r + 1) * lk];
        if let (Some(rel), Some((bh, bw))) = (blk.rel, tables.as_mut()) {
            let (kh, kw) = (rel.kh, rel.kw);
            let i = blk.i0 + r;
            let (qy, qx) = (i / rel.qw, i % rel.qw);
            let qrow = &blk.q[r * d..(r + 1) * d];
            table_bias::<F>(qrow, &rel.rh[qy * kh * d..], &rel.rh_t[qy * d * kh..], bh);
            table_bias::<F>(qrow, &rel.rw[qx * kw * d..], &rel.rw_t[qx * d * kw..], bw);
            for (seg, &hy) in srow.chunks_exact_mut(kw).zip(bh.iter()) {
                for (x, &wx) in seg.iter_mut().zip(bw.iter()) {
                    *x += hy + wx;
                }
            }
        }
        if lk == 0 {
            *iv = 0.0;
            continue;
        }
        let m = math::max(srow);
        for x in srow.iter_mut() {
            *x = math::exp1::<F>(*x - m);
        }
        *iv = 1.0 / math::sum16(srow);
    }
}

math::dispatch!(
    /// Bias + softmax numerator and inverse denominator of one query block (see the body).
    fn softmax_block(blk: &Block<'_>, s: &mut [f32], inv: &mut [f32]) -> (),
    softmax_block_body
);

/// `softmax(scale * q k^T + bias) v` per batch and head.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, Tensor>>,
    prec: Prec,
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
            Some(Rel {
                rh: r.rh.data(),
                rw: r.rw.data(),
                rh_t: transpose_table(r.rh.data(), qh, kh, d),
                rw_t: transpose_table(r.rw.data(), qw, kw, d),
                qw,
                kh,
                kw,
            })
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
    // Gather each (batch, head)'s K and V into contiguous [Lk, d] panels once: gemm reads its
    // operands many times per call, and head slices with row stride H*d measured ~25% slower
    // than contiguous ones in these thin products.
    let panel = lk * d;
    // bf16 packs its own K^T and V panels from q/k/v (below); the f32 ones are not built.
    let f32_panels = if prec == Prec::F32 {
        b * heads * 2 * panel
    } else {
        0
    };
    let mut packed = super::with_capacity(f32_panels);
    if f32_panels > 0 {
        let spare = packed.spare_capacity_mut();
        let fill = |(bh, dst): (usize, &mut [std::mem::MaybeUninit<f32>])| {
            let (bi, h) = (bh / heads, bh % heads);
            let (kdst, vdst) = dst.split_at_mut(panel);
            for j in 0..lk {
                let at = (bi * lk + j) * c + h * d;
                for (o, &x) in kdst[j * d..(j + 1) * d].iter_mut().zip(&kd[at..at + d]) {
                    o.write(x);
                }
                for (o, &x) in vdst[j * d..(j + 1) * d].iter_mut().zip(&vd[at..at + d]) {
                    o.write(x);
                }
            }
        };
        let spare = &mut spare[..b * heads * 2 * panel];
        if spare.len() >= super::PAR_MIN {
            spare
                .par_chunks_mut(2 * panel.max(1))
                .enumerate()
                .for_each(fill);
        } else {
            spare
                .chunks_mut(2 * panel.max(1))
                .enumerate()
                .for_each(fill);
        }
    }
    // SAFETY: all f32_panels elements were initialised by `fill` (none in bf16).
    unsafe { packed.set_len(f32_panels) };
    let packed = &packed[..];
    // bf16: each (batch, head)'s K^T and V packed once for all its query blocks, into one
    // buffer (one allocation the system takes back whole, not hundreds left in thread arenas).
    let (kt_len, v_len) = (packed_len(lk, d), packed_len(d, lk));
    let mut bf16_panels = Vec::new();
    let kernel = match prec {
        Prec::F32 => None,
        Prec::Bf16(kernel) => {
            bf16_panels.resize(b * heads * (kt_len + v_len), 0u32);
            bf16_panels
                .par_chunks_mut(kt_len + v_len)
                .enumerate()
                .for_each(|(bh, out)| {
                    let (bi, h) = (bh / heads, bh % heads);
                    let at = bi * lk * c + h * d;
                    let (kt_out, v_out) = out.split_at_mut(kt_len);
                    // SAFETY: head h's columns of batch bi's Lk rows of k and v, row stride c.
                    unsafe {
                        let kt = Mat {
                            ptr: kd.as_ptr().add(at),
                            rs: 1,
                            cs: c as isize,
                        };
                        let vm = Mat {
                            ptr: vd.as_ptr().add(at),
                            rs: c as isize,
                            cs: 1,
                        };
                        pack_b_into(kt, lk, d, kt_out, false);
                        pack_b_into(vm, d, lk, v_out, false);
                    }
                });
            Some(kernel)
        }
    };
    let bf16_panels = &bf16_panels[..];
    let packed_kv = |bh: usize| {
        let at = bh * (kt_len + v_len);
        (
            PackedB::view(&bf16_panels[at..at + kt_len], lk, d),
            PackedB::view(&bf16_panels[at + kt_len..at + kt_len + v_len], d, lk),
        )
    };
    let optr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (bi, h, blk) = (t / (heads * nblk), (t / nblk) % heads, t % nblk);
        let i0 = blk * qb;
        let rows = qb.min(lq - i0);
        let q0 = (bi * lq + i0) * c + h * d;
        let kv0 = (bi * heads + h) * 2 * panel;
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let need = rows * lk + rows + rows * d;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (s, rest) = buf.split_at_mut(rows * lk);
            let (inv, qblk) = rest.split_at_mut(rows);
            // The query block, contiguous (same reason as the K/V panels).
            for (r, dst) in qblk[..rows * d].chunks_exact_mut(d).enumerate() {
                dst.copy_from_slice(&qd[q0 + r * c..q0 + r * c + d]);
            }
            // SAFETY: qblk is rows x d, the K panel [Lk, d] is read transposed (d x Lk), s is
            // rows x Lk.
            unsafe {
                let qm = Mat {
                    ptr: qblk.as_ptr(),
                    rs: d as isize,
                    cs: 1,
                };
                match kernel {
                    Some(kernel) => gemm_packed(
                        kernel,
                        rows,
                        s.as_mut_ptr(),
                        lk,
                        false,
                        qm,
                        &packed_kv(bi * heads + h).0,
                        scale,
                    ),
                    None => product(
                        prec,
                        rows,
                        lk,
                        d,
                        s.as_mut_ptr(),
                        lk,
                        false,
                        qm,
                        Mat {
                            ptr: packed.as_ptr().add(kv0),
                            rs: 1,
                            cs: d as isize,
                        },
                        scale,
                        Parallelism::None,
                    ),
                }
            }
            let blk = Block {
                q: &qblk[..rows * d],
                d,
                i0,
                lk,
                rel: rel.as_ref(),
            };
            softmax_block(&blk, &mut s[..rows * lk], &mut inv[..rows]);
            let o0 = (bi * lq + i0) * c + h * d;
            // SAFETY: output rows i0..i0+rows, columns h*d..(h+1)*d belong to this task only;
            // the V panel is Lk x d.
            unsafe {
                let dst = optr.get().add(o0);
                let pm = Mat {
                    ptr: s.as_ptr(),
                    rs: lk as isize,
                    cs: 1,
                };
                match kernel {
                    Some(kernel) => gemm_packed(
                        kernel,
                        rows,
                        dst,
                        c,
                        false,
                        pm,
                        &packed_kv(bi * heads + h).1,
                        1.0,
                    ),
                    None => product(
                        prec,
                        rows,
                        d,
                        lk,
                        dst,
                        c,
                        false,
                        pm,
                        Mat {
                            ptr: packed.as_ptr().add(kv0 + panel),
                            rs: d as isize,
                            cs: 1,
                        },
                        1.0,
                        Parallelism::None,
                    ),
                }
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
