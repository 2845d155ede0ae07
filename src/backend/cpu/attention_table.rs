//! Windowed self-attention with a learned per-head bias table (TinyViT, SPEC section 8).
//!
//! `qkv` `[N, L, H * 3d]` holds `N` windows of `L = side * side` tokens (row-major in the
//! window); head `h`'s q, k and v are the columns `h*3d + (0, d, 2d) ..+d` (TinyViT's layout:
//! the projection viewed as `[.., H, 3d]` and split); `table` `[H, side * side]`.
//! Per window `n` and head `h`: `S = scale * Q K^T + B_h`, `B_h[i, j] = table[h, |yi - yj| * side
//! + |xi - xj|]`, `P = softmax_rows(S)`, `O = P V`. Output `[N, L, H * d]`.
//!
//! Backward (per window and head, recomputing `P`): `dV = P^T dO`, `dP = dO V^T`,
//! `dS = P * (dP - rowsum(dP * P))`, `dQ = scale dS K`, `dK = scale dS^T Q`, and the table
//! gradient `dtable[h, idx(i, j)] += dS[i, j]` summed over windows.
//!
//! Windows are small (49 or 196 tokens), so each (window, head) is one task on rayon with its
//! `L x L` scores in per-thread scratch; the products go through gemm on strided head slices.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::bf16::Prec;
use super::linalg::{gemm_into, product, Mat};
use super::{make, math, SendPtr};

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

use crate::backend::composed::bias_index;

struct Dims {
    n: usize,
    l: usize,
    heads: usize,
    d: usize,
}

fn check(qkv: &Tensor, table: &Tensor, side: usize, heads: usize) -> Result<Dims> {
    let s = qkv.shape();
    let bad = |m: String| Error::shape("attention_table", m);
    if s.len() != 3 || heads == 0 || !s[2].is_multiple_of(3 * heads) || s[1] != side * side {
        return Err(bad(format!(
            "qkv {s:?}: expected [N, {}, 3 * {heads} * d]",
            side * side
        )));
    }
    if table.shape() != [heads, side * side] {
        return Err(bad(format!(
            "table {:?}: expected [{heads}, {}]",
            table.shape(),
            side * side
        )));
    }
    Ok(Dims {
        n: s[0],
        l: s[1],
        heads,
        d: s[2] / (3 * heads),
    })
}

/// Scores of window `n`, head `h` into `p` (`L x L`), then softmax in place.
#[allow(clippy::too_many_arguments)]
fn probs(
    prec: Prec,
    qd: &[f32],
    dm: &Dims,
    n: usize,
    h: usize,
    scale: f32,
    table: &[f32],
    idx: &[usize],
    p: &mut [f32],
) {
    let (l, d) = (dm.l, dm.d);
    let row = 3 * dm.heads * d;
    let base = n * l * row;
    let q = Mat {
        ptr: qd[base + h * 3 * d..].as_ptr(),
        rs: row as isize,
        cs: 1,
    };
    // K^T: element (c, j) at k[j, c].
    let kt = Mat {
        ptr: qd[base + h * 3 * d + d..].as_ptr(),
        rs: 1,
        cs: row as isize,
    };
    // SAFETY: q and k^T cover L rows of d values inside window n of qkv; p is L x L.
    unsafe {
        product(
            prec,
            l,
            l,
            d,
            p.as_mut_ptr(),
            l,
            false,
            q,
            kt,
            scale,
            Parallelism::None,
        )
    };
    let tb = &table[h * l..(h + 1) * l];
    for i in 0..l {
        let srow = &mut p[i * l..(i + 1) * l];
        for (s, &k) in srow.iter_mut().zip(&idx[i * l..(i + 1) * l]) {
            *s += tb[k];
        }
        let m = math::max(srow);
        let sum = math::exp_shift_sum(srow, m);
        let inv = 1.0 / sum;
        for s in srow.iter_mut() {
            *s *= inv;
        }
    }
}

/// The forward (see the module comment).
pub(crate) fn attention_table(
    qkv: &Tensor,
    side: usize,
    heads: usize,
    scale: f32,
    table: &Tensor,
    prec: Prec,
) -> Result<Tensor> {
    let dm = check(qkv, table, side, heads)?;
    let (l, d, c) = (dm.l, dm.d, dm.heads * dm.d);
    let idx = bias_index(side);
    let mut out = super::zeroed(dm.n * l * c);
    let optr = SendPtr(out.as_mut_ptr());
    let (qd, td) = (qkv.data(), table.data());
    let row = 3 * c;
    (0..dm.n * heads).into_par_iter().for_each(|t| {
        let (n, h) = (t / heads, t % heads);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.resize(l * l, 0.0);
            probs(prec, qd, &dm, n, h, scale, td, &idx, &mut s);
            let pm = Mat {
                ptr: s.as_ptr(),
                rs: l as isize,
                cs: 1,
            };
            let v = Mat {
                ptr: qd[n * l * row + h * 3 * d + 2 * d..].as_ptr(),
                rs: row as isize,
                cs: 1,
            };
            let op = optr.get();
            // SAFETY: task (n, h) alone writes the head-h columns of window n's rows.
            unsafe {
                product(
                    prec,
                    l,
                    d,
                    l,
                    op.add(n * l * c + h * d),
                    c,
                    false,
                    pm,
                    v,
                    1.0,
                    Parallelism::None,
                )
            };
        });
    });
    make(out, &[dm.n, l, c])
}

/// The backward: `(dqkv [N, L, 3 H d], dtable [H, side^2] if asked)`.
pub(crate) fn attention_table_backward(
    qkv: &Tensor,
    table: &Tensor,
    d_o: &Tensor,
    side: usize,
    heads: usize,
    scale: f32,
    need_dtable: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dm = check(qkv, table, side, heads)?;
    let (l, d, c) = (dm.l, dm.d, dm.heads * dm.d);
    if d_o.shape() != [dm.n, l, c] {
        return Err(Error::shape(
            "attention_table_backward",
            format!("d_o {:?}, expected [{}, {l}, {c}]", d_o.shape(), dm.n),
        ));
    }
    let idx = bias_index(side);
    let row = 3 * c;
    let mut dqkv = super::zeroed(dm.n * l * row);
    let gptr = SendPtr(dqkv.as_mut_ptr());
    let (qd, td, dod) = (qkv.data(), table.data(), d_o.data());
    // Per task: its window-head's table gradient (summed afterwards, in task order, so the
    // result does not depend on the thread count).
    let dts: Vec<Vec<f32>> = (0..dm.n * heads)
        .into_par_iter()
        .map(|t| {
            let (n, h) = (t / heads, t % heads);
            let mut p = vec![0.0f32; l * l];
            probs(Prec::F32, qd, &dm, n, h, scale, td, &idx, &mut p);
            let wbase = n * l * row;
            let dob = &dod[n * l * c..];
            // dP = dO V^T.
            let mut dp = vec![0.0f32; l * l];
            let dom = Mat {
                ptr: dob[h * d..].as_ptr(),
                rs: c as isize,
                cs: 1,
            };
            let vt = Mat {
                ptr: qd[wbase + h * 3 * d + 2 * d..].as_ptr(),
                rs: 1,
                cs: row as isize,
            };
            // SAFETY: all operands cover window n's head-h slices; dp is L x L.
            unsafe {
                gemm_into(
                    l,
                    l,
                    d,
                    dp.as_mut_ptr(),
                    l,
                    false,
                    dom,
                    vt,
                    1.0,
                    Parallelism::None,
                )
            };
            // dS = P * (dP - rowsum(dP * P)).
            for i in 0..l {
                let pr = &p[i * l..(i + 1) * l];
                let dr = &mut dp[i * l..(i + 1) * l];
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for (g, &pv) in dr.iter_mut().zip(pr) {
                    *g = pv * (*g - dot);
                }
            }
            let g = gptr.get();
            let pt = Mat {
                ptr: p.as_ptr(),
                rs: 1,
                cs: l as isize,
            };
            let dst = Mat {
                ptr: dp.as_ptr(),
                rs: l as isize,
                cs: 1,
            };
            let dst_t = Mat {
                ptr: dp.as_ptr(),
                rs: 1,
                cs: l as isize,
            };
            let k = Mat {
                ptr: qd[wbase + h * 3 * d + d..].as_ptr(),
                rs: row as isize,
                cs: 1,
            };
            let q = Mat {
                ptr: qd[wbase + h * 3 * d..].as_ptr(),
                rs: row as isize,
                cs: 1,
            };
            // SAFETY: task (n, h) alone writes the head-h q/k/v columns of window n in dqkv.
            unsafe {
                let gb = g.add(wbase);
                // dV = P^T dO.
                gemm_into(
                    l,
                    d,
                    l,
                    gb.add(h * 3 * d + 2 * d),
                    row,
                    false,
                    pt,
                    dom,
                    1.0,
                    Parallelism::None,
                );
                // dQ = scale dS K.
                gemm_into(
                    l,
                    d,
                    l,
                    gb.add(h * 3 * d),
                    row,
                    false,
                    dst,
                    k,
                    scale,
                    Parallelism::None,
                );
                // dK = scale dS^T Q.
                gemm_into(
                    l,
                    d,
                    l,
                    gb.add(h * 3 * d + d),
                    row,
                    false,
                    dst_t,
                    q,
                    scale,
                    Parallelism::None,
                );
            }
            if need_dtable {
                let mut dt = vec![0.0f32; l];
                for (g, &k) in dp.iter().zip(&idx) {
                    dt[k] += g;
                }
                dt
            } else {
                Vec::new()
            }
        })
        .collect();
    let dtable = if need_dtable {
        let mut dt = vec![0.0f32; heads * l];
        for (t, part) in dts.iter().enumerate() {
            let h = t % heads;
            for (o, v) in dt[h * l..(h + 1) * l].iter_mut().zip(part) {
                *o += v;
            }
        }
        Some(make(dt, &[heads, l])?)
    } else {
        None
    };
    Ok((make(dqkv, &[dm.n, l, row])?, dtable))
}
