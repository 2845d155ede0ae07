//! The CPU backend's backward ops against naive f64 references (direct loops, explicit chain
//! rule), the references themselves against central finite differences, the trait's default
//! implementations (what the CUDA backend runs) against the CPU overrides, and run-to-run /
//! thread-count determinism of the reductions.
//!
//! Tolerances are `|got - want| <= atol + rtol |want|` with `atol` a multiple of the reference's
//! RMS: the backend sums in f32 in another order than the f64 reference (blocked GEMMs, 16-lane
//! partial sums, per-chunk partials), so each element carries a few f32 ulps of its terms'
//! magnitude, which for a cancelling sum is relative to the tensor's scale rather than to the
//! (possibly tiny) element itself.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, AttentionGrads, Backend, RelPos};
use medsa::sam::random::Rng;
use medsa::{Result, Tensor};

// ----- helpers ---------------------------------------------------------------------------------

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

fn rms(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

/// `|got - want| <= atol + tol * |want|` element-wise with `atol = tol * rms(want) + 1e-6`, the
/// worst element reported. The floor covers gradients that cancel to exactly zero (attention over
/// a single key): their O(1) terms still leave f32 rounding behind.
fn check(what: &str, got: &Tensor, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape(), shape, "{what}: shape");
    assert_eq!(got.numel(), want.len(), "{what}: element count");
    let atol = tol * rms(want) + 1e-6;
    let mut worst: Option<(usize, f64)> = None;
    let mut max_abs = 0.0f64;
    for (i, (&g, &w)) in got.data().iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        max_abs = max_abs.max(err);
        let excess = err - (atol + tol * w.abs());
        if (excess > 0.0 || excess.is_nan()) && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} of {shape:?}: got {} want {} (atol {atol:e}, rtol {tol:e}); \
             max abs error {max_abs:e}",
            got.data()[i],
            want[i]
        );
    }
}

/// Two backends' results agree to `tol` relative to the second's RMS.
fn agree(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    check(what, got, want.shape(), &f64s(want), tol);
}

fn bitwise(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    let same = a
        .data()
        .iter()
        .zip(b.data())
        .all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "{what}: results differ bitwise");
}

/// Runs `f` on a rayon pool of `n` threads.
fn with_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .expect("thread pool")
        .install(f)
}

/// Central differences of `loss` at `p` for every element, in f64. With step `h` the truncation
/// error is `O(h^2 f''')` ~ 1e-10 and the rounding error `O(eps |f| / h)` ~ 1e-11 for losses of
/// order one, so agreement to ~1e-7 verifies the analytic gradient.
fn finite_diff(p: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    let mut x = p.to_vec();
    (0..p.len())
        .map(|i| {
            x[i] = p[i] + h;
            let up = loss(&x);
            x[i] = p[i] - h;
            let down = loss(&x);
            x[i] = p[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn assert_fd(what: &str, analytic: &[f64], fd: &[f64]) {
    for (i, (&a, &f)) in analytic.iter().zip(fd).enumerate() {
        assert!(
            (a - f).abs() <= 1e-7 + 1e-6 * a.abs(),
            "{what}[{i}]: analytic {a} vs finite difference {f}"
        );
    }
}

// ----- activations -----------------------------------------------------------------------------

/// erf in f64 from the all-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} /
/// (1*3*...*(2n+1)) (no cancellation; ~1e-15 for |x| <= 6).
fn erf_ref(x: f64) -> f64 {
    let a = x.abs().min(6.0);
    let (mut term, mut sum, mut n) = (a, a, 0.0);
    while term > 1e-17 * sum {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    let r = 2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum;
    r.min(1.0).copysign(x)
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x).
fn gelu_grad_ref(x: f64) -> f64 {
    0.5 * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

#[test]
fn activate_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    // 40000 elements: above the parallel threshold, several 8192-element chunks and a remainder.
    for shape in [&[3usize, 7][..], &[4, 100, 100]] {
        let mut x = rng.tensor(shape, 6.0);
        x.data_mut()[..4].copy_from_slice(&[0.0, -0.0, 1e-30, -1e-30]);
        let dy = rng.tensor(shape, 1.0);
        let relu = cpu.activate_backward(&x, &dy, Act::Relu).unwrap();
        for ((&g, &xv), &d) in relu.data().iter().zip(x.data()).zip(dy.data()) {
            // Exact: a select. The derivative at 0 is 0 (PyTorch's convention).
            assert_eq!(g, if xv > 0.0 { d } else { 0.0 }, "relu' at {xv}");
        }
        let none = cpu.activate_backward(&x, &dy, Act::None).unwrap();
        bitwise("identity backward", &none, &dy);
        let gelu = cpu.activate_backward(&x, &dy, Act::Gelu).unwrap();
        let want: Vec<f64> = x
            .data()
            .iter()
            .zip(dy.data())
            .map(|(&xv, &d)| d as f64 * gelu_grad_ref(xv as f64))
            .collect();
        // The vectorised erf and exp are accurate to a few 1e-8 absolute; the derivative is at
        // most ~1.13 and dy at most 1, so a few f32 roundings stay under 3e-7.
        for (i, (&g, &w)) in gelu.data().iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 3e-7 + 1e-6 * w.abs(),
                "gelu' at x = {}: got {g} want {w}",
                x.data()[i]
            );
        }
    }
    let a = rng.tensor(&[2, 3], 1.0);
    assert!(cpu
        .activate_backward(&a, &rng.tensor(&[3, 2], 1.0), Act::Gelu)
        .is_err());
}

// ----- sum_rows and linear ---------------------------------------------------------------------

fn sum_rows_ref(x: &Tensor, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for (i, &v) in x.data().iter().enumerate() {
        out[i % cols] += v as f64;
    }
    out
}

#[test]
fn sum_rows_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    // One chunk, several serial chunks, several parallel chunks (narrow and wide rows).
    for (shape, cols) in [
        (&[7usize, 5][..], 5usize),
        (&[2, 3, 4], 12),
        (&[1000, 3], 3),
        (&[70000, 3], 3),
        (&[200, 768], 768),
        (&[4, 5, 6], 30),
        (&[4, 5, 6], 1),
    ] {
        let x = rng.tensor(shape, 1.0);
        let got = cpu.sum_rows(&x, cols).unwrap();
        check(
            &format!("sum_rows {shape:?} / {cols}"),
            &got,
            &[cols],
            &sum_rows_ref(&x, cols),
            1e-5,
        );
    }
    let x = rng.tensor(&[4, 5], 1.0);
    assert!(cpu.sum_rows(&x, 3).is_err());
    assert!(cpu.sum_rows(&x, 0).is_err());
}

/// `dx = dy @ w`, `dw = dy^T x`, `db = sum_rows(dy)` by direct loops.
fn linear_grads_ref(x: &Tensor, w: &Tensor, dy: &Tensor) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = dy.numel() / n;
    let (xd, wd, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; rows * k];
    let mut dw = vec![0.0; n * k];
    let mut db = vec![0.0; n];
    for r in 0..rows {
        for o in 0..n {
            let g = yd[r * n + o] as f64;
            db[o] += g;
            for i in 0..k {
                dx[r * k + i] += g * wd[o * k + i] as f64;
                dw[o * k + i] += g * xd[r * k + i] as f64;
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn linear_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    // The last case is large enough for gemm's threaded path.
    for (lead, k, n) in [
        (&[2usize, 7][..], 13usize, 11usize),
        (&[1][..], 1, 1),
        (&[3, 1, 5][..], 64, 3),
        (&[600][..], 96, 80),
    ] {
        let xs: Vec<usize> = lead.iter().copied().chain([k]).collect();
        let ys: Vec<usize> = lead.iter().copied().chain([n]).collect();
        let x = rng.tensor(&xs, 1.0);
        let w = rng.tensor(&[n, k], 1.0);
        let dy = rng.tensor(&ys, 1.0);
        let (dx_ref, dw_ref, db_ref) = linear_grads_ref(&x, &w, &dy);
        let what = format!("linear {xs:?} -> {n}");
        let dx = cpu.linear_backward_input(&dy, &w).unwrap();
        check(&format!("{what} dx"), &dx, &xs, &dx_ref, 1e-5);
        let (dw, db) = cpu.linear_backward_weight(&x, &dy, true).unwrap();
        check(&format!("{what} dw"), &dw, &[n, k], &dw_ref, 1e-5);
        check(&format!("{what} db"), &db.unwrap(), &[n], &db_ref, 1e-5);
        let (dw2, db2) = cpu.linear_backward_weight(&x, &dy, false).unwrap();
        assert!(db2.is_none());
        bitwise(&format!("{what} dw without bias"), &dw2, &dw);
    }
    let x = rng.tensor(&[4, 3], 1.0);
    assert!(cpu
        .linear_backward_input(&rng.tensor(&[4, 5], 1.0), &rng.tensor(&[4, 3], 1.0))
        .is_err());
    assert!(cpu
        .linear_backward_weight(&x, &rng.tensor(&[5, 2], 1.0), true)
        .is_err());
}

// ----- layer norm ------------------------------------------------------------------------------

/// LayerNorm forward in f64 (two-pass statistics, biased variance).
fn layer_norm_fwd(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let c = g.len();
    let mut y = vec![0.0; x.len()];
    for (row, out) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            out[i] = (row[i] - mean) * rstd * g[i] + b[i];
        }
    }
    y
}

/// LayerNorm backward through the full per-row Jacobian of `xhat`:
/// `d xhat_j / d x_i = rstd (delta_ij - 1/C) - rstd xhat_i xhat_j / C`.
fn layer_norm_bwd(x: &[f64], g: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = g.len();
    let mut dx = vec![0.0; x.len()];
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    for r in 0..x.len() / c {
        let row = &x[r * c..(r + 1) * c];
        let gy = &dy[r * c..(r + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        for j in 0..c {
            dg[j] += gy[j] * xhat[j];
            db[j] += gy[j];
        }
        for i in 0..c {
            let mut acc = 0.0;
            for j in 0..c {
                let delta = if i == j { 1.0 } else { 0.0 };
                let jac = rstd * (delta - 1.0 / c as f64) - rstd * xhat[i] * xhat[j] / c as f64;
                acc += gy[j] * g[j] * jac;
            }
            dx[r * c + i] = acc;
        }
    }
    (dx, dg, db)
}

#[test]
fn layer_norm_reference_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let (rows, c, eps) = (3, 6, 1e-5);
    let x = f64s(&rng.tensor(&[rows, c], 2.0));
    let g = f64s(&rng.tensor(&[c], 1.0));
    let b = f64s(&rng.tensor(&[c], 1.0));
    let w = f64s(&rng.tensor(&[rows, c], 1.0));
    // loss = sum(y * w), so dy = w.
    let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
        layer_norm_fwd(x, g, b, eps)
            .iter()
            .zip(&w)
            .map(|(y, w)| y * w)
            .sum()
    };
    let (dx, dg, db) = layer_norm_bwd(&x, &g, &w, eps);
    assert_fd("layer_norm dx", &dx, &finite_diff(&x, |p| loss(p, &g, &b)));
    assert_fd("layer_norm dg", &dg, &finite_diff(&g, |p| loss(&x, p, &b)));
    assert_fd("layer_norm db", &db, &finite_diff(&b, |p| loss(&x, &g, p)));
}

#[test]
fn layer_norm_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    // The [300, 200] case splits into two row chunks on the parallel path; the offset exercises
    // the two-pass statistics.
    for (shape, offset) in [
        (&[3usize, 5, 24][..], 0.0f32),
        (&[4, 7], 3.0),
        (&[300, 200], 0.0),
        (&[2, 768], 0.0),
        (&[5, 1], 0.0),
    ] {
        let mut x = rng.tensor(shape, 1.0);
        for v in x.data_mut() {
            *v += offset;
        }
        let c = *shape.last().unwrap();
        let g = rng.tensor(&[c], 1.5);
        let dy = rng.tensor(shape, 1.0);
        let eps = 1e-6;
        let (dx, dg, db) = cpu.layer_norm_backward(&x, &g, &dy, eps).unwrap();
        let (dx_ref, dg_ref, db_ref) = layer_norm_bwd(&f64s(&x), &f64s(&g), &f64s(&dy), eps as f64);
        let what = format!("layer_norm_backward {shape:?} +{offset}");
        // dx multiplies f32-rounded statistics by 1/std (~1.7 for uniform inputs): 1e-4.
        check(&format!("{what} dx"), &dx, shape, &dx_ref, 1e-4);
        check(&format!("{what} dg"), &dg, &[c], &dg_ref, 1e-4);
        check(&format!("{what} db"), &db, &[c], &db_ref, 1e-5);
    }
    let x = rng.tensor(&[4, 3], 1.0);
    assert!(cpu
        .layer_norm_backward(&x, &rng.tensor(&[4], 1.0), &x, 1e-5)
        .is_err());
    assert!(cpu
        .layer_norm_backward(&x, &rng.tensor(&[3], 1.0), &rng.tensor(&[3, 4], 1.0), 1e-5)
        .is_err());
}

// ----- attention -------------------------------------------------------------------------------

/// Attention geometry for the f64 reference.
#[derive(Clone, Copy, Debug)]
struct Attn {
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    /// `(q_grid, k_grid)` when a relative-position bias is used.
    rel: Option<((usize, usize), (usize, usize))>,
}

impl Attn {
    fn c(&self) -> usize {
        self.heads * self.d
    }
}

/// Probabilities of query `i` of `(bi, h)`: the logits `scale q k^T + bias` materialised and
/// softmaxed in f64.
fn attn_probs(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    rh: &[f64],
    rw: &[f64],
    scale: f64,
    (bi, h, i): (usize, usize, usize),
) -> Vec<f64> {
    let (c, d) = (a.c(), a.d);
    let qi = &q[(bi * a.lq + i) * c + h * d..][..d];
    let mut s: Vec<f64> = (0..a.lk)
        .map(|j| {
            let kj = &k[(bi * a.lk + j) * c + h * d..][..d];
            let mut acc = scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>();
            if let Some(((_, qw), (kh, kw))) = a.rel {
                let (qy, qx, ky, kx) = (i / qw, i % qw, j / kw, j % kw);
                for cc in 0..d {
                    acc += qi[cc] * rh[(qy * kh + ky) * d + cc];
                    acc += qi[cc] * rw[(qx * kw + kx) * d + cc];
                }
            }
            acc
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s
        .iter_mut()
        .map(|x| {
            *x = (*x - m).exp();
            *x
        })
        .sum();
    s.iter_mut().for_each(|x| *x /= z);
    s
}

/// Attention forward in f64.
fn attn_fwd(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rh: &[f64],
    rw: &[f64],
    scale: f64,
) -> Vec<f64> {
    let (c, d) = (a.c(), a.d);
    let mut o = vec![0.0; a.b * a.lq * c];
    for bi in 0..a.b {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let p = attn_probs(a, q, k, rh, rw, scale, (bi, h, i));
                for (j, pj) in p.iter().enumerate() {
                    for cc in 0..d {
                        o[(bi * a.lq + i) * c + h * d + cc] +=
                            pj * v[(bi * a.lk + j) * c + h * d + cc];
                    }
                }
            }
        }
    }
    o
}

/// Gradients `(dq, dk, dv, drh, drw)` of attention in f64, element by element through the chain
/// rule: `dP = dO V^T`, the softmax Jacobian `dS_j = sum_l dP_l P_l (delta_jl - P_j)`, then every
/// logit's partial derivatives (`scale k_j`, `scale q_i`, and the bias' `q_i`, `rh`, `rw`).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn attn_bwd(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rh: &[f64],
    rw: &[f64],
    d_o: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, d) = (a.c(), a.d);
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut drh = vec![0.0; rh.len()];
    let mut drw = vec![0.0; rw.len()];
    for bi in 0..a.b {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let p = attn_probs(a, q, k, rh, rw, scale, (bi, h, i));
                let qa = (bi * a.lq + i) * c + h * d;
                let dp: Vec<f64> = (0..a.lk)
                    .map(|j| {
                        let va = (bi * a.lk + j) * c + h * d;
                        (0..d).map(|cc| d_o[qa + cc] * v[va + cc]).sum()
                    })
                    .collect();
                for j in 0..a.lk {
                    let ka = (bi * a.lk + j) * c + h * d;
                    for cc in 0..d {
                        dv[ka + cc] += p[j] * d_o[qa + cc];
                    }
                    let mut ds = 0.0;
                    for l in 0..a.lk {
                        let delta = if j == l { 1.0 } else { 0.0 };
                        ds += dp[l] * p[l] * (delta - p[j]);
                    }
                    for cc in 0..d {
                        dq[qa + cc] += ds * scale * k[ka + cc];
                        dk[ka + cc] += ds * scale * q[qa + cc];
                    }
                    if let Some(((_, qw), (kh, kw))) = a.rel {
                        let (qy, qx, ky, kx) = (i / qw, i % qw, j / kw, j % kw);
                        for cc in 0..d {
                            let (ah, aw) = ((qy * kh + ky) * d + cc, (qx * kw + kx) * d + cc);
                            dq[qa + cc] += ds * (rh[ah] + rw[aw]);
                            drh[ah] += ds * q[qa + cc];
                            drw[aw] += ds * q[qa + cc];
                        }
                    }
                }
            }
        }
    }
    (dq, dk, dv, drh, drw)
}

/// Random inputs of one attention case: `(q, k, v, rh, rw, d_o)`.
fn attn_inputs(a: &Attn, rng: &mut Rng) -> [Tensor; 6] {
    let c = a.c();
    let ((qh, qw), (kh, kw)) = a.rel.unwrap_or(((0, 0), (0, 0)));
    [
        rng.tensor(&[a.b, a.lq, c], 1.0),
        rng.tensor(&[a.b, a.lk, c], 1.0),
        rng.tensor(&[a.b, a.lk, c], 1.0),
        rng.tensor(&[qh, kh, a.d], 0.3),
        rng.tensor(&[qw, kw, a.d], 0.3),
        rng.tensor(&[a.b, a.lq, c], 1.0),
    ]
}

fn rel_of<'a>(a: &Attn, rh: &'a Tensor, rw: &'a Tensor) -> Option<RelPos<'a, Tensor>> {
    a.rel.map(|(q_grid, k_grid)| RelPos {
        rh,
        rw,
        q_grid,
        k_grid,
    })
}

fn cpu_attn_grads(cpu: &Cpu, a: &Attn, x: &[Tensor; 6], scale: f32) -> AttentionGrads<Tensor> {
    let [q, k, v, rh, rw, d_o] = x;
    let o = cpu
        .attention(q, k, v, a.heads, scale, rel_of(a, rh, rw))
        .unwrap();
    cpu.attention_backward(q, k, v, &o, d_o, a.heads, scale, rel_of(a, rh, rw))
        .unwrap()
}

fn grid(qg: (usize, usize), kg: (usize, usize)) -> Option<((usize, usize), (usize, usize))> {
    Some((qg, kg))
}

#[test]
fn attention_reference_matches_finite_differences() {
    let mut rng = Rng::new(6);
    // Relative bias with different query and key grids, two heads, a batch of two.
    let a = Attn {
        b: 2,
        lq: 6,
        lk: 6,
        heads: 2,
        d: 4,
        rel: grid((3, 2), (2, 3)),
    };
    let scale = 0.5;
    let x = attn_inputs(&a, &mut rng);
    let [q, k, v, rh, rw, w] = x.each_ref().map(f64s);
    // loss = sum(o * w), so d_o = w.
    let loss = |q: &[f64], k: &[f64], v: &[f64], rh: &[f64], rw: &[f64]| -> f64 {
        attn_fwd(&a, q, k, v, rh, rw, scale)
            .iter()
            .zip(&w)
            .map(|(o, w)| o * w)
            .sum()
    };
    let (dq, dk, dv, drh, drw) = attn_bwd(&a, &q, &k, &v, &rh, &rw, &w, scale);
    assert_fd("dq", &dq, &finite_diff(&q, |p| loss(p, &k, &v, &rh, &rw)));
    assert_fd("dk", &dk, &finite_diff(&k, |p| loss(&q, p, &v, &rh, &rw)));
    assert_fd("dv", &dv, &finite_diff(&v, |p| loss(&q, &k, p, &rh, &rw)));
    assert_fd("drh", &drh, &finite_diff(&rh, |p| loss(&q, &k, &v, p, &rw)));
    assert_fd("drw", &drw, &finite_diff(&rw, |p| loss(&q, &k, &v, &rh, p)));
}

#[test]
fn attention_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(7);
    let cases = [
        // Windowed-attention shape, odd grid, one and three heads.
        Attn {
            b: 2,
            lq: 35,
            lk: 35,
            heads: 1,
            d: 8,
            rel: grid((7, 5), (7, 5)),
        },
        Attn {
            b: 2,
            lq: 35,
            lk: 35,
            heads: 3,
            d: 16,
            rel: grid((7, 5), (7, 5)),
        },
        // Query and key grids that differ.
        Attn {
            b: 2,
            lq: 35,
            lk: 12,
            heads: 3,
            d: 8,
            rel: grid((7, 5), (3, 4)),
        },
        // Two query blocks (143 rows -> 2 x 72) per head, with keys on another grid.
        Attn {
            b: 1,
            lq: 143,
            lk: 99,
            heads: 2,
            d: 8,
            rel: grid((13, 11), (9, 11)),
        },
        // Cross attention (Lq != Lk), no bias, both ways round.
        Attn {
            b: 2,
            lq: 7,
            lk: 13,
            heads: 3,
            d: 8,
            rel: None,
        },
        Attn {
            b: 2,
            lq: 35,
            lk: 6,
            heads: 1,
            d: 16,
            rel: None,
        },
        Attn {
            b: 2,
            lq: 7,
            lk: 70,
            heads: 3,
            d: 16,
            rel: None,
        },
        // Parallel path with more (batch, head) tasks than table-gradient groups.
        Attn {
            b: 3,
            lq: 64,
            lk: 64,
            heads: 8,
            d: 16,
            rel: grid((8, 8), (8, 8)),
        },
        Attn {
            b: 1,
            lq: 1,
            lk: 1,
            heads: 1,
            d: 3,
            rel: grid((1, 1), (1, 1)),
        },
    ];
    for a in cases {
        for scale in [1.0 / (a.d as f32).sqrt(), 2.0] {
            let x = attn_inputs(&a, &mut rng);
            let g = cpu_attn_grads(&cpu, &a, &x, scale);
            let [q, k, v, rh, rw, d_o] = x.each_ref().map(f64s);
            let (dq, dk, dv, drh, drw) = attn_bwd(&a, &q, &k, &v, &rh, &rw, &d_o, scale as f64);
            let what = format!("{a:?} scale {scale}");
            let (c, d) = (a.c(), a.d);
            // f32 GEMMs over Lk (dq) or Lq (dk, dv) terms and f32 probabilities: 1e-4 of the
            // tensor's RMS. The tables sum over batch, heads and queries: 2e-4.
            check(&format!("{what} dq"), &g.dq, &[a.b, a.lq, c], &dq, 1e-4);
            check(&format!("{what} dk"), &g.dk, &[a.b, a.lk, c], &dk, 1e-4);
            check(&format!("{what} dv"), &g.dv, &[a.b, a.lk, c], &dv, 1e-4);
            match (a.rel, g.drel) {
                (Some(((qh, qw), (kh, kw))), Some((grh, grw))) => {
                    check(&format!("{what} drh"), &grh, &[qh, kh, d], &drh, 2e-4);
                    check(&format!("{what} drw"), &grw, &[qw, kw, d], &drw, 2e-4);
                }
                (None, None) => {}
                _ => panic!("{what}: drel present without rel or missing with it"),
            }
        }
    }
}

#[test]
fn attention_backward_is_deterministic_across_threads() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(8);
    let a = Attn {
        b: 3,
        lq: 144,
        lk: 144,
        heads: 8,
        d: 16,
        rel: grid((12, 12), (12, 12)),
    };
    // Two query blocks per head and more tasks than table-gradient groups.
    let x = attn_inputs(&a, &mut rng);
    let one = with_threads(1, || cpu_attn_grads(&cpu, &a, &x, 0.25));
    let three = with_threads(3, || cpu_attn_grads(&cpu, &a, &x, 0.25));
    bitwise("dq", &one.dq, &three.dq);
    bitwise("dk", &one.dk, &three.dk);
    bitwise("dv", &one.dv, &three.dv);
    let ((h1, w1), (h3, w3)) = (one.drel.unwrap(), three.drel.unwrap());
    bitwise("drh", &h1, &h3);
    bitwise("drw", &w1, &w3);
}

#[test]
fn attention_backward_rejects_bad_shapes() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(9);
    let t = rng.tensor(&[1, 4, 6], 1.0);
    let o5 = rng.tensor(&[1, 5, 6], 1.0);
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &t, 4, 1.0, None)
        .is_err());
    assert!(cpu
        .attention_backward(&t, &t, &t, &o5, &t, 2, 1.0, None)
        .is_err());
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &o5, 2, 1.0, None)
        .is_err());
    let rh = rng.tensor(&[2, 2, 3], 1.0);
    let rw = rng.tensor(&[2, 3, 3], 1.0);
    let rel = RelPos {
        rh: &rh,
        rw: &rw,
        q_grid: (2, 2),
        k_grid: (2, 2),
    };
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &t, 2, 1.0, Some(rel))
        .is_err());
}

// ----- convolutions ----------------------------------------------------------------------------

/// conv2d gradients by direct loops over (output pixel, tap, channels): `(dx, dw, db)`.
fn conv2d_grads_ref(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, h, wd, cin) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cout, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (ho, wo) = (dy.shape()[1], dy.shape()[2]);
    let (xd, wdt, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; x.numel()];
    let mut dw = vec![0.0; w.numel()];
    let mut db = vec![0.0; cout];
    for bi in 0..bn {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let g = yd[((bi * ho + oy) * wo + ox) * cout + o] as f64;
                    db[o] += g;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            for c in 0..cin {
                                let xa = ((bi * h + iy as usize) * wd + ix as usize) * cin + c;
                                let wa = ((o * cin + c) * kh + ky) * kw + kx;
                                dx[xa] += g * wdt[wa] as f64;
                                dw[wa] += g * xd[xa] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn conv2d_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(10);
    // (b, h, w, cin, cout, (kh, kw), stride, pad)
    for (b, h, w, cin, cout, (kh, kw), stride, pad) in [
        (
            2usize,
            8usize,
            12usize,
            3usize,
            5usize,
            (4usize, 4usize),
            4usize,
            0usize,
        ), // patch embed
        (2, 7, 9, 6, 4, (3, 3), 1, 1), // neck 3x3
        (1, 9, 8, 5, 3, (3, 3), 2, 1),
        (2, 5, 6, 4, 7, (1, 1), 1, 0),    // pointwise: no im2col
        (1, 6, 7, 3, 2, (5, 3), 3, 2),    // taps landing wholly in the padding
        (1, 3, 3, 2, 2, (3, 3), 1, 2),    // padding wider than needed
        (2, 32, 40, 16, 8, (3, 3), 1, 1), // parallel im2col / col2im
    ] {
        let x = rng.tensor(&[b, h, w, cin], 1.0);
        let wt = rng.tensor(&[cout, cin, kh, kw], 1.0);
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        let dy = rng.tensor(&[b, ho, wo, cout], 1.0);
        let (dx_ref, dw_ref, db_ref) = conv2d_grads_ref(&x, &wt, &dy, stride, pad);
        let what = format!(
            "conv2d x {:?} w {:?} s{stride} p{pad}",
            x.shape(),
            wt.shape()
        );
        let (dx, dw, db) = cpu
            .conv2d_backward(&x, &wt, &dy, stride, pad, true, true)
            .unwrap();
        check(
            &format!("{what} dx"),
            &dx.unwrap(),
            x.shape(),
            &dx_ref,
            1e-5,
        );
        check(&format!("{what} dw"), &dw, wt.shape(), &dw_ref, 1e-5);
        check(&format!("{what} db"), &db.unwrap(), &[cout], &db_ref, 1e-5);
        let (dx2, dw2, db2) = cpu
            .conv2d_backward(&x, &wt, &dy, stride, pad, false, false)
            .unwrap();
        assert!(
            dx2.is_none() && db2.is_none(),
            "{what}: unrequested gradients"
        );
        bitwise(&format!("{what} dw without dx"), &dw2, &dw);
    }
    let x = rng.tensor(&[1, 4, 4, 2], 1.0);
    let wt = rng.tensor(&[3, 2, 3, 3], 1.0);
    // Wrong dy shape, zero stride, channel mismatch.
    assert!(cpu
        .conv2d_backward(&x, &wt, &rng.tensor(&[1, 4, 4, 3], 1.0), 1, 0, true, true)
        .is_err());
    assert!(cpu
        .conv2d_backward(&x, &wt, &rng.tensor(&[1, 2, 2, 3], 1.0), 0, 0, true, true)
        .is_err());
    assert!(cpu
        .conv2d_backward(
            &x,
            &rng.tensor(&[3, 1, 3, 3], 1.0),
            &rng.tensor(&[1, 2, 2, 3], 1.0),
            1,
            0,
            true,
            true
        )
        .is_err());
}

/// Transposed-conv gradients by direct loops: `(dx, dw, db)`.
fn conv_t_grads_ref(x: &Tensor, w: &Tensor, dy: &Tensor) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, h, wd, ci) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let co = w.shape()[1];
    let (xd, wdt, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; x.numel()];
    let mut dw = vec![0.0; w.numel()];
    let mut db = vec![0.0; co];
    for bi in 0..bn {
        for i in 0..h {
            for j in 0..wd {
                for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    for o in 0..co {
                        let g =
                            yd[((bi * 2 * h + 2 * i + di) * 2 * wd + 2 * j + dj) * co + o] as f64;
                        db[o] += g;
                        for c in 0..ci {
                            let xa = ((bi * h + i) * wd + j) * ci + c;
                            let wa = ((c * co + o) * 2 + di) * 2 + dj;
                            dx[xa] += g * wdt[wa] as f64;
                            dw[wa] += g * xd[xa] as f64;
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn conv_transpose2x2_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(11);
    for (b, h, w, ci, co) in [
        (2usize, 3usize, 5usize, 6usize, 4usize),
        (1, 16, 16, 32, 16),
        (1, 1, 1, 1, 1),
    ] {
        let x = rng.tensor(&[b, h, w, ci], 1.0);
        let wt = rng.tensor(&[ci, co, 2, 2], 1.0);
        let dy = rng.tensor(&[b, 2 * h, 2 * w, co], 1.0);
        let (dx_ref, dw_ref, db_ref) = conv_t_grads_ref(&x, &wt, &dy);
        let (dx, dw, db) = cpu.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        let what = format!("conv_transpose2x2 x {:?} w {:?}", x.shape(), wt.shape());
        check(&format!("{what} dx"), &dx, x.shape(), &dx_ref, 1e-5);
        check(&format!("{what} dw"), &dw, wt.shape(), &dw_ref, 1e-5);
        check(&format!("{what} db"), &db, &[co], &db_ref, 1e-5);
    }
    let x = rng.tensor(&[1, 2, 2, 3], 1.0);
    let wt = rng.tensor(&[3, 4, 2, 2], 1.0);
    assert!(cpu
        .conv_transpose2x2_backward(&x, &wt, &rng.tensor(&[1, 4, 4, 3], 1.0))
        .is_err());
    assert!(cpu
        .conv_transpose2x2_backward(
            &x,
            &rng.tensor(&[4, 4, 2, 2], 1.0),
            &rng.tensor(&[1, 4, 4, 4], 1.0)
        )
        .is_err());
}

// ----- the trait defaults (the CUDA backend's path) ------------------------------------------

/// A backend that forwards every required op to the CPU but keeps the trait's default
/// `sum_rows`, `linear_backward_input`, `linear_backward_weight` and
/// `conv_transpose2x2_backward`, which are built from forward ops.
struct DefaultsOnly(Cpu);

impl Backend for DefaultsOnly {
    type Tensor = Tensor;

    fn name(&self) -> String {
        format!("defaults over {}", self.0.name())
    }
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        self.0.upload(t)
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        self.0.download(t)
    }
    fn dims<'a>(&self, t: &'a Tensor) -> &'a [usize] {
        self.0.dims(t)
    }
    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        self.0.reshape(t, shape)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        self.0.permute(x, perm)
    }
    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        self.0.concat(xs, dim)
    }
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.0.narrow(x, dim, start, len)
    }
    fn index_select0(&self, x: &Tensor, index: &[usize]) -> Result<Tensor> {
        self.0.index_select0(x, index)
    }
    fn window_partition(&self, x: &Tensor, ws: usize) -> Result<Tensor> {
        self.0.window_partition(x, ws)
    }
    fn window_unpartition(&self, x: &Tensor, ws: usize, hw: (usize, usize)) -> Result<Tensor> {
        self.0.window_unpartition(x, ws, hw)
    }
    fn add_scaled(&self, a: &Tensor, alpha: f32, b: &Tensor, beta: f32) -> Result<Tensor> {
        self.0.add_scaled(a, alpha, b, beta)
    }
    fn activate(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.0.activate(x, act)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
        self.0.linear(x, w, b, act)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        self.0.matmul(a, b, trans_b)
    }
    fn layer_norm(&self, x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        self.0.layer_norm(x, g, b, eps)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<Tensor> {
        self.0.attention(q, k, v, heads, scale, rel)
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        self.0.conv2d(x, w, b, stride, pad)
    }
    fn conv_transpose2x2(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.0.conv_transpose2x2(x, w, b)
    }
    fn resize_bilinear(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.0.resize_bilinear(x, size)
    }
    fn resize_bicubic(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.0.resize_bicubic(x, size)
    }
    fn activate_backward(&self, x: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
        self.0.activate_backward(x, dy, act)
    }
    fn layer_norm_backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        dy: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.0.layer_norm_backward(x, g, dy, eps)
    }
    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<AttentionGrads<Tensor>> {
        self.0
            .attention_backward(q, k, v, o, d_o, heads, scale, rel)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        self.0.conv2d_backward(x, w, dy, stride, pad, need_dx, bias)
    }
}

#[test]
fn trait_defaults_agree_with_cpu_overrides() {
    let cpu = Cpu::new();
    let def = DefaultsOnly(Cpu::new());
    let mut rng = Rng::new(12);
    // Both sides are f32 with different summation orders (a GEMM against ones vs. chunked column
    // sums; one GEMM vs. another's blocking): 1e-5 of the RMS.
    for (shape, cols) in [
        (&[7usize, 5][..], 5usize),
        (&[70000, 3], 3),
        (&[3, 4, 64], 256),
    ] {
        let x = rng.tensor(shape, 1.0);
        agree(
            &format!("sum_rows {shape:?}"),
            &def.sum_rows(&x, cols).unwrap(),
            &cpu.sum_rows(&x, cols).unwrap(),
            1e-5,
        );
    }
    assert!(def.sum_rows(&rng.tensor(&[4, 5], 1.0), 3).is_err());
    for (lead, k, n) in [(&[2usize, 7][..], 13usize, 11usize), (&[600][..], 96, 80)] {
        let xs: Vec<usize> = lead.iter().copied().chain([k]).collect();
        let ys: Vec<usize> = lead.iter().copied().chain([n]).collect();
        let x = rng.tensor(&xs, 1.0);
        let w = rng.tensor(&[n, k], 1.0);
        let dy = rng.tensor(&ys, 1.0);
        agree(
            "linear_backward_input",
            &def.linear_backward_input(&dy, &w).unwrap(),
            &cpu.linear_backward_input(&dy, &w).unwrap(),
            1e-5,
        );
        let (dw_d, db_d) = def.linear_backward_weight(&x, &dy, true).unwrap();
        let (dw_c, db_c) = cpu.linear_backward_weight(&x, &dy, true).unwrap();
        agree("linear_backward_weight dw", &dw_d, &dw_c, 1e-5);
        agree(
            "linear_backward_weight db",
            &db_d.unwrap(),
            &db_c.unwrap(),
            1e-5,
        );
        assert!(def
            .linear_backward_weight(&x, &dy, false)
            .unwrap()
            .1
            .is_none());
    }
    for (b, h, w, ci, co) in [
        (2usize, 3usize, 5usize, 6usize, 4usize),
        (1, 16, 16, 32, 16),
    ] {
        let x = rng.tensor(&[b, h, w, ci], 1.0);
        let wt = rng.tensor(&[ci, co, 2, 2], 1.0);
        let dy = rng.tensor(&[b, 2 * h, 2 * w, co], 1.0);
        let (dx_d, dw_d, db_d) = def.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        let (dx_c, dw_c, db_c) = cpu.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        agree("conv_transpose2x2_backward dx", &dx_d, &dx_c, 1e-5);
        agree("conv_transpose2x2_backward dw", &dw_d, &dw_c, 1e-5);
        agree("conv_transpose2x2_backward db", &db_d, &db_c, 1e-5);
    }
}

// ----- determinism of the row reductions ------------------------------------------------------

#[test]
fn row_reductions_are_thread_count_independent() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(13);
    let x = rng.tensor(&[70000, 3], 1.0);
    let s1 = with_threads(1, || cpu.sum_rows(&x, 3).unwrap());
    let s3 = with_threads(3, || cpu.sum_rows(&x, 3).unwrap());
    bitwise("sum_rows", &s1, &s3);
    let x = rng.tensor(&[300, 200], 1.0);
    let g = rng.tensor(&[200], 1.0);
    let dy = rng.tensor(&[300, 200], 1.0);
    let l1 = with_threads(1, || cpu.layer_norm_backward(&x, &g, &dy, 1e-6).unwrap());
    let l3 = with_threads(3, || cpu.layer_norm_backward(&x, &g, &dy, 1e-6).unwrap());
    bitwise("layer_norm dx", &l1.0, &l3.0);
    bitwise("layer_norm dg", &l1.1, &l3.1);
    bitwise("layer_norm db", &l1.2, &l3.2);
    let x = rng.tensor(&[2, 32, 40, 16], 1.0);
    let w = rng.tensor(&[8, 16, 3, 3], 1.0);
    let dy = rng.tensor(&[2, 32, 40, 8], 1.0);
    let c1 = with_threads(1, || {
        cpu.conv2d_backward(&x, &w, &dy, 1, 1, true, true).unwrap()
    });
    let c3 = with_threads(3, || {
        cpu.conv2d_backward(&x, &w, &dy, 1, 1, true, true).unwrap()
    });
    bitwise("conv2d dx", c1.0.as_ref().unwrap(), c3.0.as_ref().unwrap());
    bitwise("conv2d dw", &c1.1, &c3.1);
    bitwise("conv2d db", c1.2.as_ref().unwrap(), c3.2.as_ref().unwrap());
}
