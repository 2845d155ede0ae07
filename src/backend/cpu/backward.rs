//! Backward ops: the gradients of the forward ops in the sibling modules, given the forward
//! inputs and the output gradient `dy`.
//!
//! * `activate_backward`: `dx = dy * act'(x)`; exact GELU `act'(x) = Phi(x) + x phi(x)`, ReLU
//!   `1[x > 0]`.
//! * `sum_rows`: column sums of `x` viewed as `[rows, cols]`.
//! * `linear_backward_input`: `dx = dy @ w`; `linear_backward_weight`: `dw = dy^T x`,
//!   `db = sum_rows(dy)`. gemm reads the transposed operands through their strides, so nothing is
//!   copied.
//! * `layer_norm_backward`: with `xhat = (x - mean) rstd` and `gh = dy * g`, per row
//!   `dx = rstd (gh - mean(gh) - xhat mean(gh xhat))`; `dg = sum_rows(dy xhat)`,
//!   `db = sum_rows(dy)`.
//! * `attention_backward`: in `attention_backward.rs`.
//! * `conv2d_backward`: im2col rows `(ky, kx, c)` as in the forward; `dw = dy^T col`,
//!   `dcol = dy w`, and `dx` gathers `dcol` back (col2im) row by row of the input.
//! * `conv_transpose2x2_backward`: `dy` regrouped into rows `(b, i, j)` of `(di, dj, o)`, after
//!   which `dx = g wr^T` and `dwr = x^T g` are single GEMMs.
//!
//! Determinism: every reduction over rows (bias and gain gradients, the relative-position tables)
//! adds per-chunk partial sums in chunk order, over chunks fixed by the shapes alone, so results
//! are bitwise identical whatever the thread count. Each attention task owns whole columns of
//! `dq`, `dk` and `dv` (one batch and head), so those need no reduction at all.

use rayon::prelude::*;

use crate::backend::Act;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::bf16::Prec;
use super::linalg::{gemm_new, par_for, Mat};
use super::math::{self, madd};
use super::{for_chunks, make, zeroed, PAR_MIN};

pub(crate) use super::attention_backward::attention_backward;

// ----- small vector kernels --------------------------------------------------------------------

/// `sum_i f(a[i])` with 16 independent accumulators so the loop vectorises.
#[inline(always)]
pub(super) fn sum_by(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    for x in &mut ca {
        for i in 0..16 {
            acc[i] += f(x[i]);
        }
    }
    let mut s: f32 = ca.remainder().iter().map(|&x| f(x)).sum();
    for v in acc {
        s += v;
    }
    s
}

/// `sum_i f(a[i], b[i])` with 16 independent accumulators.
#[inline(always)]
pub(super) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += f(x[i], y[i]);
        }
    }
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for v in acc {
        s += v;
    }
    s
}

/// `y += a * x`.
#[inline(always)]
pub(super) fn axpy<const F: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = madd::<F>(a, v, *o);
    }
}

// ----- activations -----------------------------------------------------------------------------

/// `1 / sqrt(2 pi)`: the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU gradient on one chunk; `out` holds `erf(x / sqrt 2)` on entry and
/// `dy * (Phi(x) + x phi(x))` on exit.
#[inline(always)]
fn gelu_grad_body<const F: bool>(x: &[f32], dy: &[f32], out: &mut [f32]) {
    for ((o, &xv), &g) in out.iter_mut().zip(x).zip(dy) {
        let pdf = math::exp1::<F>(-0.5 * xv * xv) * INV_SQRT_2PI;
        let d = madd::<F>(xv, pdf, madd::<F>(0.5, *o, 0.5));
        *o = g * d;
    }
}

math::dispatch!(
    /// See [`gelu_grad_body`].
    fn gelu_grad(x: &[f32], dy: &[f32], out: &mut [f32]) -> (),
    gelu_grad_body
);

/// `dx = dy * act'(x)`.
pub(crate) fn activate_backward(x: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
    if x.shape() != dy.shape() {
        return Err(Error::shape(
            "activate_backward",
            format!("x {:?} and dy {:?}", x.shape(), dy.shape()),
        ));
    }
    let (xd, gd) = (x.data(), dy.data());
    // Fixed slices so each task's erf pass stays in L1 before the second pass reads it.
    const CHUNK: usize = 8192;
    let mut out = zeroed(xd.len());
    match act {
        // Tensors are immutable, so sharing dy's buffer is indistinguishable from a copy.
        Act::None => return Ok(dy.clone()),
        Act::Relu => for_chunks(&mut out, CHUNK, |i, dst| {
            let at = i * CHUNK;
            let (xs, gs) = (&xd[at..at + dst.len()], &gd[at..at + dst.len()]);
            for ((o, &xv), &g) in dst.iter_mut().zip(xs).zip(gs) {
                *o = if xv > 0.0 { g } else { 0.0 };
            }
        }),
        Act::Gelu => for_chunks(&mut out, CHUNK, |i, dst| {
            let at = i * CHUNK;
            let (xs, gs) = (&xd[at..at + dst.len()], &gd[at..at + dst.len()]);
            for (o, &xv) in dst.iter_mut().zip(xs) {
                *o = xv * std::f32::consts::FRAC_1_SQRT_2;
            }
            math::erf_inplace(dst);
            gelu_grad(xs, gs, dst);
        }),
    }
    make(out, x.shape())
}

// ----- row reductions --------------------------------------------------------------------------

/// Elements per partial sum of a row reduction. The chunking depends on the shape only, so the
/// rounding (and the result) does not depend on the thread count.
const ROW_CHUNK: usize = 1 << 15;

/// Rows per partial sum for rows of `cols` elements.
fn rows_per_chunk(cols: usize) -> usize {
    (ROW_CHUNK / cols.max(1)).max(1)
}

/// `acc[c] += sum_r x[r, c]`.
fn add_rows(acc: &mut [f32], x: &[f32]) {
    for row in x.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// Column sums of `x` viewed as `[rows, cols]` (`cols > 0` divides `x.len()`): partial sums over
/// fixed row chunks, in parallel when large, then added in chunk order.
fn col_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols];
    let rows = x.len() / cols;
    let per = rows_per_chunk(cols);
    let nchunks = rows.div_ceil(per);
    if nchunks <= 1 {
        add_rows(&mut out, x);
        return out;
    }
    let mut parts = zeroed(nchunks * cols);
    let part = |(i, p): (usize, &mut [f32])| {
        let end = ((i + 1) * per).min(rows);
        add_rows(p, &x[i * per * cols..end * cols]);
    };
    if x.len() >= PAR_MIN {
        parts.par_chunks_mut(cols).enumerate().for_each(part);
    } else {
        parts.chunks_mut(cols).enumerate().for_each(part);
    }
    for p in parts.chunks_exact(cols) {
        for (o, &v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Column sums of `x` viewed as `[rows, cols]` -> `[cols]`.
pub(crate) fn sum_rows(x: &Tensor, cols: usize) -> Result<Tensor> {
    let n = x.numel();
    if cols == 0 || !n.is_multiple_of(cols) {
        return Err(Error::shape(
            "sum_rows",
            format!("{n} elements are not rows of {cols}"),
        ));
    }
    make(col_sums(x.data(), cols), &[cols])
}

// ----- linear ----------------------------------------------------------------------------------

/// `dx = dy @ w`: `dy` `[.., N]`, `w` `[N, K]` -> `[.., K]`.
pub(crate) fn linear_backward_input(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (s, ws) = (dy.shape(), w.shape());
    if s.is_empty() || ws.len() != 2 || ws[0] != s[s.len() - 1] {
        return Err(Error::shape(
            "linear_backward_input",
            format!("dy {s:?} and weight {ws:?} (want [N, K])"),
        ));
    }
    let (n, k) = (ws[0], ws[1]);
    let m: usize = s[..s.len() - 1].iter().product();
    let out = gemm_new(
        Prec::F32,
        m,
        k,
        n,
        Mat {
            ptr: dy.data().as_ptr(),
            rs: n as isize,
            cs: 1,
        },
        Mat {
            ptr: w.data().as_ptr(),
            rs: k as isize,
            cs: 1,
        },
        par_for(m, k, n),
    );
    let mut shape = s.to_vec();
    *shape.last_mut().expect("rank checked above") = k;
    make(out, &shape)
}

/// `dw = dy^T x` `[N, K]` and, if `bias`, `db = sum_rows(dy)` `[N]`.
pub(crate) fn linear_backward_weight(
    x: &Tensor,
    dy: &Tensor,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (xs, ys) = (x.shape(), dy.shape());
    let bad = || {
        Error::shape(
            "linear_backward_weight",
            format!("x {xs:?} and dy {ys:?} have different row counts"),
        )
    };
    if xs.is_empty() || ys.is_empty() {
        return Err(bad());
    }
    let (k, n) = (xs[xs.len() - 1], ys[ys.len() - 1]);
    let rows: usize = xs[..xs.len() - 1].iter().product();
    if rows != ys[..ys.len() - 1].iter().product::<usize>() {
        return Err(bad());
    }
    // dy^T is dy read with swapped strides; the sum runs over the rows.
    let dw = gemm_new(
        Prec::F32,
        n,
        k,
        rows,
        Mat {
            ptr: dy.data().as_ptr(),
            rs: 1,
            cs: n as isize,
        },
        Mat {
            ptr: x.data().as_ptr(),
            rs: k as isize,
            cs: 1,
        },
        par_for(n, k, rows),
    );
    let db = if bias && n > 0 {
        Some(make(col_sums(dy.data(), n), &[n])?)
    } else if bias {
        Some(make(Vec::new(), &[0])?)
    } else {
        None
    };
    Ok((make(dw, &[n, k])?, db))
}

// ----- layer norm ------------------------------------------------------------------------------

/// LayerNorm backward over a chunk of whole rows: writes `dx` and adds the chunk's gain and bias
/// gradients into `part` (`[dg | db]`, `2 C`).
#[inline(always)]
fn ln_rows_body<const F: bool>(
    x: &[f32],
    dy: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    part: &mut [f32],
) {
    let c = g.len();
    let cf = c as f32;
    let (dg, db) = part.split_at_mut(c);
    for ((xr, yr), dxr) in x
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        // The forward's two-pass statistics (one-pass E[x^2] - E[x]^2 cancels when |mean| >> std).
        let mean = sum_by(xr, |v| v) / cf;
        let var = sum_by(xr, |v| (v - mean) * (v - mean)) / cf;
        let rstd = 1.0 / (var + eps).sqrt();
        // dx holds gh = dy * g until the last pass.
        for ((o, &d), &gg) in dxr.iter_mut().zip(yr).zip(g) {
            *o = d * gg;
        }
        let mean_gh = math::sum16(dxr) / cf;
        let mean_ghx = sum_zip(dxr, xr, |gh, v| gh * (v - mean)) * rstd / cf;
        for (((o, &v), &d), (dgj, dbj)) in dxr
            .iter_mut()
            .zip(xr)
            .zip(yr)
            .zip(dg.iter_mut().zip(db.iter_mut()))
        {
            let xhat = (v - mean) * rstd;
            *dgj = madd::<F>(d, xhat, *dgj);
            *dbj += d;
            *o = rstd * (*o - mean_gh - xhat * mean_ghx);
        }
    }
}

math::dispatch!(
    /// See [`ln_rows_body`].
    fn ln_rows(x: &[f32], dy: &[f32], g: &[f32], eps: f32, dx: &mut [f32], part: &mut [f32]) -> (),
    ln_rows_body
);

/// Gradient of LayerNorm over the last dimension: `(dx, dg, db)`.
pub(crate) fn layer_norm_backward(
    x: &Tensor,
    g: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = x.shape();
    let c = *s
        .last()
        .ok_or_else(|| Error::shape("layer_norm_backward", "scalar input"))?;
    if g.shape() != [c] || dy.shape() != s {
        return Err(Error::shape(
            "layer_norm_backward",
            format!("x {s:?} with g {:?} and dy {:?}", g.shape(), dy.shape()),
        ));
    }
    if c == 0 {
        return Ok((x.clone(), g.clone(), g.clone()));
    }
    let (xd, yd, gd) = (x.data(), dy.data(), g.data());
    let rows = x.numel() / c;
    let per = rows_per_chunk(c);
    let nchunks = rows.div_ceil(per);
    let mut dx = zeroed(x.numel());
    let mut parts = zeroed(nchunks * 2 * c);
    let chunk = |(i, (dxc, part)): (usize, (&mut [f32], &mut [f32]))| {
        let at = i * per * c;
        let (xs, ys) = (&xd[at..at + dxc.len()], &yd[at..at + dxc.len()]);
        ln_rows(xs, ys, gd, eps, dxc, part);
    };
    if xd.len() >= PAR_MIN {
        dx.par_chunks_mut(per * c)
            .zip(parts.par_chunks_mut(2 * c))
            .enumerate()
            .for_each(chunk);
    } else {
        dx.chunks_mut(per * c)
            .zip(parts.chunks_mut(2 * c))
            .enumerate()
            .for_each(chunk);
    }
    let mut dgb = vec![0.0f32; 2 * c];
    for p in parts.chunks_exact(2 * c) {
        for (o, &v) in dgb.iter_mut().zip(p) {
            *o += v;
        }
    }
    let db = dgb.split_off(c);
    Ok((make(dx, s)?, make(dgb, &[c])?, make(db, &[c])?))
}

/// A contiguous `rows x ld` row-major operand for `linalg::gemm_into`.
pub(super) fn rows_of(ptr: *const f32, ld: usize) -> Mat {
    Mat {
        ptr,
        rs: ld as isize,
        cs: 1,
    }
}

/// The transpose of a contiguous row-major matrix with row stride `ld`, read in place.
pub(super) fn cols_of(ptr: *const f32, ld: usize) -> Mat {
    Mat {
        ptr,
        rs: 1,
        cs: ld as isize,
    }
}

// ----- convolutions ----------------------------------------------------------------------------

/// The geometry of one conv2d.
#[derive(Clone, Copy)]
struct ConvGeom {
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl ConvGeom {
    /// Length of one im2col row: `(ky, kx, c)`.
    fn kk(&self) -> usize {
        self.kh * self.kw * self.cin
    }

    /// A 1x1 stride-1 unpadded conv, whose im2col matrix is the NHWC input itself.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// The range of taps `kx` of output column `ox` that land inside the input, and the input
    /// column of tap 0 (consecutive taps read consecutive input pixels whatever the stride).
    fn taps(&self, ox: usize) -> (isize, usize, usize) {
        let ix0 = (ox * self.stride) as isize - self.pad as isize;
        let lo = (-ix0).max(0) as usize;
        let hi = ((self.w as isize - ix0).min(self.kw as isize)).max(0) as usize;
        (ix0, lo, hi)
    }
}

/// im2col as in the forward: row `(b, oy, ox)` holds its receptive field ordered `(ky, kx, c)`,
/// zeros where it overlaps the padding.
fn im2col(x: &[f32], g: ConvGeom) -> Vec<f32> {
    let kk = g.kk();
    let mut col = zeroed(g.b * g.ho * g.wo * kk);
    for_chunks(&mut col, kk, |row, dst| {
        let (bi, oy, ox) = (row / (g.ho * g.wo), (row / g.wo) % g.ho, row % g.wo);
        let (ix0, lo, hi) = g.taps(ox);
        if lo >= hi {
            return;
        }
        for ky in 0..g.kh {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let at = ((bi * g.h + iy as usize) * g.w + (ix0 + lo as isize) as usize) * g.cin;
            let d0 = (ky * g.kw + lo) * g.cin;
            let len = (hi - lo) * g.cin;
            dst[d0..d0 + len].copy_from_slice(&x[at..at + len]);
        }
    });
    col
}

/// col2im as a gather: each input row `(b, iy)` sums the im2col-gradient entries of every
/// (output pixel, tap) that read it, so tasks write disjoint rows and the order of the sum is
/// fixed.
fn col2im(dcol: &[f32], g: ConvGeom) -> Vec<f32> {
    let kk = g.kk();
    let mut dx = zeroed(g.b * g.h * g.w * g.cin);
    for_chunks(&mut dx, g.w * g.cin, |row, dst| {
        let (bi, iy) = (row / g.h, row % g.h);
        for ky in 0..g.kh {
            let t = (iy + g.pad) as isize - ky as isize;
            if t < 0 || !(t as usize).is_multiple_of(g.stride) || t as usize / g.stride >= g.ho {
                continue;
            }
            let oy = t as usize / g.stride;
            for ox in 0..g.wo {
                let (ix0, lo, hi) = g.taps(ox);
                if lo >= hi {
                    continue;
                }
                let src = ((bi * g.ho + oy) * g.wo + ox) * kk + (ky * g.kw + lo) * g.cin;
                let d0 = (ix0 + lo as isize) as usize * g.cin;
                let len = (hi - lo) * g.cin;
                for (o, &v) in dst[d0..d0 + len].iter_mut().zip(&dcol[src..src + len]) {
                    *o += v;
                }
            }
        }
    });
    dx
}

/// Gradient of conv2d: `(dx if need_dx, dw, db if bias)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    need_dx: bool,
    bias: bool,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let (sx, sw, sy) = (x.shape(), w.shape(), dy.shape());
    let bad = || {
        Error::shape(
            "conv2d_backward",
            format!(
                "x {sx:?} (NHWC), w {sw:?} ([Cout, Cin, kh, kw]), dy {sy:?}, stride {stride}, \
                 pad {pad}"
            ),
        )
    };
    if sx.len() != 4 || sw.len() != 4 || sw[1] != sx[3] || stride == 0 {
        return Err(bad());
    }
    let (bn, h, wd, cin) = (sx[0], sx[1], sx[2], sx[3]);
    let (cout, kh, kw) = (sw[0], sw[2], sw[3]);
    if h + 2 * pad < kh || wd + 2 * pad < kw {
        return Err(bad());
    }
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    if sy != [bn, ho, wo, cout] {
        return Err(bad());
    }
    let g = ConvGeom {
        b: bn,
        h,
        w: wd,
        cin,
        kh,
        kw,
        ho,
        wo,
        stride,
        pad,
    };
    let (kk, khw, m) = (g.kk(), kh * kw, bn * ho * wo);
    let yd = dy.data();
    let db = if bias {
        Some(make(
            if cout > 0 {
                col_sums(yd, cout)
            } else {
                Vec::new()
            },
            &[cout],
        )?)
    } else {
        None
    };
    // dwr [Cout, (ky, kx, c)] = dy^T col, then back to PyTorch's [Cout, Cin, kh, kw].
    let col_owned;
    let col: &[f32] = if g.pointwise() {
        x.data()
    } else {
        col_owned = im2col(x.data(), g);
        &col_owned
    };
    let dwr = gemm_new(
        Prec::F32,
        cout,
        kk,
        m,
        cols_of(yd.as_ptr(), cout),
        rows_of(col.as_ptr(), kk),
        par_for(cout, kk, m),
    );
    let mut dw = zeroed(cout * kk);
    for o in 0..cout {
        for c in 0..cin {
            for t in 0..khw {
                dw[(o * cin + c) * khw + t] = dwr[o * kk + t * cin + c];
            }
        }
    }
    let dx = if need_dx {
        // w as [Cout, (ky, kx, c)], matching the im2col rows; dcol = dy wr.
        let wsrc = w.data();
        let mut wr = zeroed(cout * kk);
        for o in 0..cout {
            for c in 0..cin {
                for t in 0..khw {
                    wr[o * kk + t * cin + c] = wsrc[(o * cin + c) * khw + t];
                }
            }
        }
        let dcol = gemm_new(
            Prec::F32,
            m,
            kk,
            cout,
            rows_of(yd.as_ptr(), cout),
            rows_of(wr.as_ptr(), kk),
            par_for(m, kk, cout),
        );
        let dx = if g.pointwise() {
            dcol
        } else {
            col2im(&dcol, g)
        };
        Some(make(dx, sx)?)
    } else {
        None
    };
    Ok((dx, make(dw, sw)?, db))
}

/// Gradient of the kernel-2 stride-2 transposed conv: `(dx, dw, db)`.
pub(crate) fn conv_transpose2x2_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, wsh, ys) = (x.shape(), w.shape(), dy.shape());
    if xs.len() != 4
        || wsh.len() != 4
        || ys.len() != 4
        || wsh[0] != xs[3]
        || wsh[2] != 2
        || wsh[3] != 2
        || ys != [xs[0], 2 * xs[1], 2 * xs[2], wsh[1]]
    {
        return Err(Error::shape(
            "conv_transpose2x2_backward",
            format!("x {xs:?} (NHWC), w {wsh:?} ([Cin, Cout, 2, 2]), dy {ys:?}"),
        ));
    }
    let (bn, h, wd, ci, co) = (xs[0], xs[1], xs[2], xs[3], wsh[1]);
    let (m, n4) = (bn * h * wd, 4 * co);
    let yd = dy.data();
    // g[(b, i, j), (di, dj, o)] = dy[b, 2i+di, 2j+dj, o]: for each di the (dj, o) run is 2 Cout
    // contiguous floats of dy.
    let mut gm = zeroed(m * n4);
    for_chunks(&mut gm, n4.max(1), |row, dst| {
        let (bi, i, j) = (row / (h * wd), (row / wd) % h, row % wd);
        for di in 0..2 {
            let at = ((bi * 2 * h + 2 * i + di) * 2 * wd + 2 * j) * co;
            dst[di * 2 * co..(di + 1) * 2 * co].copy_from_slice(&yd[at..at + 2 * co]);
        }
    });
    // w [C, O, di, dj] -> wr [C, (di, dj, o)].
    let wsrc = w.data();
    let mut wr = zeroed(ci * n4);
    for c in 0..ci {
        for o in 0..co {
            for t in 0..4 {
                wr[c * n4 + t * co + o] = wsrc[(c * co + o) * 4 + t];
            }
        }
    }
    // dx [M, C] = g wr^T.
    let dx = gemm_new(
        Prec::F32,
        m,
        ci,
        n4,
        rows_of(gm.as_ptr(), n4),
        cols_of(wr.as_ptr(), n4),
        par_for(m, ci, n4),
    );
    // dwr [C, (di, dj, o)] = x^T g.
    let dwr = gemm_new(
        Prec::F32,
        ci,
        n4,
        m,
        cols_of(x.data().as_ptr(), ci),
        rows_of(gm.as_ptr(), n4),
        par_for(ci, n4, m),
    );
    let mut dw = zeroed(ci * n4);
    for c in 0..ci {
        for o in 0..co {
            for t in 0..4 {
                dw[(c * co + o) * 4 + t] = dwr[c * n4 + t * co + o];
            }
        }
    }
    let db = if co > 0 { col_sums(yd, co) } else { Vec::new() };
    Ok((make(dx, xs)?, make(dw, wsh)?, make(db, &[co])?))
}
