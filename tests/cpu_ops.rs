//! The CPU backend against naive, obviously-correct references (plain loops, f64 accumulation)
//! on seeded random inputs, plus hand-derived known values for the resizes and accuracy sweeps for
//! the vectorised exp / erf.
//!
//! Comparisons use `|got - want| <= atol + rtol * |want|` with rtol = 1e-4: the backend sums in
//! f32 in a different order than the f64 reference (blocked GEMM, vector partial sums), so long
//! reductions differ by a few f32 ulps times the sum length.

use medsa::backend::cpu::{math, Cpu};
use medsa::backend::{Act, Backend, RelPos};
use medsa::Tensor;

const RTOL: f64 = 1e-4;

/// xorshift64*: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| self.uniform()).collect(), shape).unwrap()
    }
}

fn assert_close(what: &str, got: &Tensor, want_shape: &[usize], want: &[f64], atol: f64) {
    assert_eq!(got.shape(), want_shape, "{what}: shape");
    assert_eq!(got.numel(), want.len(), "{what}: element count");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.data().iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let excess = err - (atol + RTOL * w.abs());
        if (excess > 0.0 || excess.is_nan()) && worst.is_none_or(|(_, e)| excess > e || e.is_nan())
        {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} of {want_shape:?}: got {} want {} (|diff| {:e}, atol {atol:e}, rtol {RTOL:e})",
            got.data()[i],
            want[i],
            (got.data()[i] as f64 - want[i]).abs()
        );
    }
}

fn exact(what: &str, got: &Tensor, want_shape: &[usize], want: &[f32]) {
    let w: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(what, got, want_shape, &w, 0.0);
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&v| v as f64).collect()
}

// ----- references ----------------------------------------------------------------------------

/// erf in f64 from the all-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} /
/// (1*3*...*(2n+1)), which has no cancellation; accurate to ~1e-15 for |x| <= 6.
fn erf_ref(x: f64) -> f64 {
    let a = x.abs().min(6.0);
    let mut term = a;
    let mut sum = a;
    let mut n = 0.0;
    while term > 1e-17 * sum {
        n += 1.0;
        term *= 2.0 * a * a / (2.0 * n + 1.0);
        sum += term;
    }
    let r = 2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum;
    r.min(1.0).copysign(x)
}

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn permute_ref(x: &Tensor, perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let s = x.shape();
    let out_shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let ist = strides(s);
    let n = x.numel();
    let mut out = Vec::with_capacity(n);
    for mut i in 0..n {
        let mut idx = vec![0; out_shape.len()];
        for a in (0..out_shape.len()).rev() {
            idx[a] = i % out_shape[a];
            i /= out_shape[a];
        }
        let off: usize = (0..perm.len()).map(|a| idx[a] * ist[perm[a]]).sum();
        out.push(x.data()[off]);
    }
    (out_shape, out)
}

/// Relative-position inputs of the reference: `(rh, rw, q_grid, k_grid)`.
type RelRef<'a> = (&'a Tensor, &'a Tensor, (usize, usize), (usize, usize));

fn attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    rel: Option<RelRef<'_>>,
) -> Vec<f64> {
    let (b, lq, c) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = c / heads;
    let (qd, kd, vd) = (q.data(), k.data(), v.data());
    let mut out = vec![0.0; b * lq * c];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..lq {
                let qv = |cc: usize| qd[(bi * lq + i) * c + h * d + cc] as f64;
                let mut s = vec![0.0f64; lk];
                for (j, sj) in s.iter_mut().enumerate() {
                    let mut acc = 0.0;
                    for cc in 0..d {
                        acc += qv(cc) * kd[(bi * lk + j) * c + h * d + cc] as f64;
                    }
                    *sj = scale * acc;
                    if let Some((rh, rw, (_qh, qw), (kh, kw))) = rel {
                        let (qy, qx) = (i / qw, i % qw);
                        let (ky, kx) = (j / kw, j % kw);
                        let _ = kh;
                        let mut bias = 0.0;
                        for cc in 0..d {
                            bias += qv(cc) * rh.data()[(qy * kh + ky) * d + cc] as f64;
                            bias += qv(cc) * rw.data()[(qx * kw + kx) * d + cc] as f64;
                        }
                        *sj += bias;
                    }
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for cc in 0..d {
                    let mut acc = 0.0;
                    for j in 0..lk {
                        acc += e[j] / z * vd[(bi * lk + j) * c + h * d + cc] as f64;
                    }
                    out[(bi * lq + i) * c + h * d + cc] = acc;
                }
            }
        }
    }
    out
}

fn conv2d_ref(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> (Vec<usize>, Vec<f64>) {
    let (bn, h, wd, cin) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cout, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let mut out = vec![0.0; bn * ho * wo * cout];
    for bi in 0..bn {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let mut acc = b.map_or(0.0, |b| b.data()[o] as f64);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            for c in 0..cin {
                                let xv =
                                    x.data()[((bi * h + iy as usize) * wd + ix as usize) * cin + c];
                                let wv = w.data()[((o * cin + c) * kh + ky) * kw + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((bi * ho + oy) * wo + ox) * cout + o] = acc;
                }
            }
        }
    }
    (vec![bn, ho, wo, cout], out)
}

/// Bilinear, written directly in 2-D as PyTorch's kernel does.
fn bilinear_ref(x: &Tensor, oh: usize, ow: usize) -> Vec<f64> {
    let (b, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let coord = |o: usize, inp: usize, out: usize| {
        let src = ((o as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
        let i0 = src.floor() as usize;
        let i0 = i0.min(inp - 1);
        (i0, (i0 + 1).min(inp - 1), src - i0 as f64)
    };
    let mut out = vec![0.0; b * c * oh * ow];
    for p in 0..b * c {
        let px = |y: usize, xx: usize| x.data()[(p * h + y) * w + xx] as f64;
        for oy in 0..oh {
            let (y0, y1, ly) = coord(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, lx) = coord(ox, w, ow);
                out[(p * oh + oy) * ow + ox] = (1.0 - ly)
                    * ((1.0 - lx) * px(y0, x0) + lx * px(y0, x1))
                    + ly * ((1.0 - lx) * px(y1, x0) + lx * px(y1, x1));
            }
        }
    }
    out
}

fn cubic_w(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// Bicubic as a full 4x4 weighted sum per output pixel.
fn bicubic_ref(x: &Tensor, oh: usize, ow: usize) -> Vec<f64> {
    let (b, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let taps = |o: usize, inp: usize, out: usize| {
        let src = (o as f64 + 0.5) * inp as f64 / out as f64 - 0.5;
        let i = src.floor();
        let t = src - i;
        let i = i as isize;
        let mut r = [(0usize, 0.0f64); 4];
        for (k, slot) in r.iter_mut().enumerate() {
            let off = k as isize - 1;
            let idx = (i + off).clamp(0, inp as isize - 1) as usize;
            *slot = (idx, cubic_w(t - off as f64));
        }
        r
    };
    let mut out = vec![0.0; b * c * oh * ow];
    for p in 0..b * c {
        for oy in 0..oh {
            let ty = taps(oy, h, oh);
            for ox in 0..ow {
                let tx = taps(ox, w, ow);
                let mut acc = 0.0;
                for &(yi, wy) in &ty {
                    for &(xi, wx) in &tx {
                        acc += wy * wx * x.data()[(p * h + yi) * w + xi] as f64;
                    }
                }
                out[(p * oh + oy) * ow + ox] = acc;
            }
        }
    }
    out
}

// ----- math kernels ---------------------------------------------------------------------------

#[test]
fn exp_accuracy_dense_grid() {
    let n = 2_000_000;
    let xs: Vec<f32> = (0..=n)
        .map(|i| -88.0 + 176.0 * i as f32 / n as f32)
        .collect();
    let mut ys = xs.clone();
    math::exp_inplace(&mut ys);
    let mut worst = (0.0f64, 0.0f32);
    for (&x, &y) in xs.iter().zip(&ys) {
        let want = (x as f64).exp();
        // Below the normal range (x < -87.3) an f32 result has fewer mantissa bits; judge those by
        // half an ulp of the smallest normal's exponent instead.
        let rel = if want < f32::MIN_POSITIVE as f64 {
            (y as f64 - want).abs() / f32::MIN_POSITIVE as f64 * 1e-7
        } else {
            (y as f64 - want).abs() / want
        };
        if rel > worst.0 || rel.is_nan() {
            worst = (rel, x);
        }
    }
    assert!(
        worst.0 < 2e-7,
        "exp: worst relative error {:e} at x = {}",
        worst.0,
        worst.1
    );
    // Edges: overflow, underflow, exact zero.
    let mut e = vec![0.0, 100.0, -1000.0, f32::NEG_INFINITY, 88.7];
    math::exp_inplace(&mut e);
    assert_eq!(e[0], 1.0);
    assert_eq!(e[1], f32::INFINITY);
    assert_eq!(e[2], 0.0);
    assert_eq!(e[3], 0.0);
    assert!(e[4].is_finite() && e[4] > 3.0e38);
}

#[test]
fn exp_shift_sum_matches() {
    let mut rng = Rng::new(7);
    for len in [1usize, 5, 16, 17, 100, 4096] {
        let xs: Vec<f32> = (0..len).map(|_| rng.uniform() * 20.0).collect();
        let mut ys = xs.clone();
        let s = math::exp_shift_sum(&mut ys, 3.0);
        // The shift itself is an f32 subtraction; the reference exponentiates that same value.
        let want: f64 = xs.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
        assert!(
            (s as f64 - want).abs() <= 1e-5 * want,
            "len {len}: {s} vs {want}"
        );
        for (&x, &y) in xs.iter().zip(&ys) {
            let w = ((x - 3.0) as f64).exp();
            assert!((y as f64 - w).abs() <= 2e-7 * w, "{x}: {y} vs {w}");
        }
    }
}

#[test]
fn erf_accuracy_dense_grid() {
    let n = 2_000_000;
    let xs: Vec<f32> = (0..=n).map(|i| -7.0 + 14.0 * i as f32 / n as f32).collect();
    let mut ys = xs.clone();
    math::erf_inplace(&mut ys);
    let mut worst = (0.0f64, 0.0f32);
    for (&x, &y) in xs.iter().zip(&ys) {
        let err = (y as f64 - erf_ref(x as f64)).abs();
        if err > worst.0 || err.is_nan() {
            worst = (err, x);
        }
    }
    assert!(
        worst.0 < 2e-7,
        "erf: worst absolute error {:e} at x = {}",
        worst.0,
        worst.1
    );
    let mut e = vec![0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30];
    math::erf_inplace(&mut e);
    assert_eq!(e[..3], [0.0, 1.0, -1.0]);
    assert!((e[3] - 1.128_379_2e-30).abs() < 1e-36);
}

#[test]
fn erf_reference_is_sane() {
    // Spot values of the test's own reference (Abramowitz & Stegun table 7.1).
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        assert!((erf_ref(x) - want).abs() < 1e-14, "erf_ref({x})");
        assert!((erf_ref(-x) + want).abs() < 1e-14);
    }
}

// ----- layout ---------------------------------------------------------------------------------

#[test]
fn permute_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[0, 2, 3, 1]),
        (&[2, 3, 4, 5], &[0, 3, 1, 2]),
        (&[3, 5], &[1, 0]),
        (&[1, 64, 70, 33], &[0, 3, 1, 2]),
        (&[1, 33, 64, 70], &[0, 2, 3, 1]),
        (&[2, 3, 1, 5, 7], &[4, 2, 0, 3, 1]),
        (&[4, 6, 8], &[2, 1, 0]),
        (&[4, 6, 8], &[0, 1, 2]),
        (&[7], &[0]),
        (&[2, 1, 3], &[1, 2, 0]),
        (&[5, 2, 3, 4, 6], &[0, 3, 1, 4, 2]),
    ];
    for (shape, perm) in cases {
        let x = rng.tensor(shape);
        let (ws, want) = permute_ref(&x, perm);
        let y = cpu.permute(&x, perm).unwrap();
        exact(&format!("permute {shape:?} {perm:?}"), &y, &ws, &want);
    }
    assert!(cpu.permute(&rng.tensor(&[2, 3]), &[0, 0]).is_err());
    assert!(cpu.permute(&rng.tensor(&[2, 3]), &[0]).is_err());
}

#[test]
fn concat_narrow_index_select() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    let a = rng.tensor(&[2, 3, 4]);
    let b = rng.tensor(&[2, 5, 4]);
    let y = cpu.concat(&[&a, &b], 1).unwrap();
    let mut want = Vec::new();
    for i in 0..2 {
        want.extend_from_slice(&a.data()[i * 12..(i + 1) * 12]);
        want.extend_from_slice(&b.data()[i * 20..(i + 1) * 20]);
    }
    exact("concat dim 1", &y, &[2, 8, 4], &want);
    let c = rng.tensor(&[2, 3, 4]);
    let y = cpu.concat(&[&a, &c, &a], 0).unwrap();
    let want: Vec<f32> = [a.data(), c.data(), a.data()].concat();
    exact("concat dim 0", &y, &[6, 3, 4], &want);
    let y = cpu.concat(&[&a, &c], 2).unwrap();
    let want: Vec<f32> = (0..6)
        .flat_map(|r| [&a.data()[r * 4..r * 4 + 4], &c.data()[r * 4..r * 4 + 4]].concat())
        .collect();
    exact("concat dim 2", &y, &[2, 3, 8], &want);
    assert!(cpu.concat(&[&a, &b], 0).is_err());
    assert!(cpu.concat(&[&a, &b], 3).is_err());

    let x = rng.tensor(&[3, 7, 5]);
    let y = cpu.narrow(&x, 1, 2, 4).unwrap();
    let mut want = Vec::new();
    for i in 0..3 {
        for j in 2..6 {
            want.extend_from_slice(&x.data()[(i * 7 + j) * 5..(i * 7 + j + 1) * 5]);
        }
    }
    exact("narrow", &y, &[3, 4, 5], &want);
    let y = cpu.narrow(&x, 2, 4, 1).unwrap();
    let want: Vec<f32> = (0..21).map(|r| x.data()[r * 5 + 4]).collect();
    exact("narrow last", &y, &[3, 7, 1], &want);
    assert!(cpu.narrow(&x, 1, 5, 3).is_err());

    let y = cpu.index_select0(&x, &[2, 0, 2]).unwrap();
    let want: Vec<f32> = [&x.data()[70..105], &x.data()[0..35], &x.data()[70..105]].concat();
    exact("index_select0", &y, &[3, 7, 5], &want);
    assert!(cpu.index_select0(&x, &[3]).is_err());
}

#[test]
fn window_partition_roundtrip_and_padding() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    for &(b, h, w, c, ws) in &[
        (1, 14, 14, 3, 7),
        (2, 10, 13, 4, 4),
        (1, 64, 64, 8, 14),
        (2, 5, 3, 2, 6),
        (1, 9, 9, 1, 3),
    ] {
        let x = rng.tensor(&[b, h, w, c]);
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let y = cpu.window_partition(&x, ws).unwrap();
        let mut want = vec![0.0f32; b * nh * nw * ws * ws * c];
        for bi in 0..b {
            for wy in 0..nh {
                for wx in 0..nw {
                    let win = bi * nh * nw + wy * nw + wx;
                    for r in 0..ws {
                        for s in 0..ws {
                            let (yy, xx) = (wy * ws + r, wx * ws + s);
                            if yy < h && xx < w {
                                for ch in 0..c {
                                    want[((win * ws + r) * ws + s) * c + ch] =
                                        x.data()[((bi * h + yy) * w + xx) * c + ch];
                                }
                            }
                        }
                    }
                }
            }
        }
        exact(
            &format!("window_partition {h}x{w} ws {ws}"),
            &y,
            &[b * nh * nw, ws, ws, c],
            &want,
        );
        let back = cpu.window_unpartition(&y, ws, (h, w)).unwrap();
        exact("window_unpartition", &back, &[b, h, w, c], x.data());
        // Unpartition must ignore (not copy) padding content: perturb the padded windows.
        let noisy = rng.tensor(y.shape());
        let back = cpu.window_unpartition(&noisy, ws, (h, w)).unwrap();
        let mut want = vec![0.0f32; b * h * w * c];
        for bi in 0..b {
            for yy in 0..h {
                for xx in 0..w {
                    let win = bi * nh * nw + (yy / ws) * nw + xx / ws;
                    for ch in 0..c {
                        want[((bi * h + yy) * w + xx) * c + ch] =
                            noisy.data()[((win * ws + yy % ws) * ws + xx % ws) * c + ch];
                    }
                }
            }
        }
        exact("window_unpartition noisy", &back, &[b, h, w, c], &want);
    }
    assert!(cpu
        .window_unpartition(&rng.tensor(&[3, 4, 4, 2]), 4, (8, 8))
        .is_err());
    assert!(cpu.window_partition(&rng.tensor(&[3, 4, 4]), 4).is_err());
}

// ----- elementwise ----------------------------------------------------------------------------

#[test]
fn add_scaled_same_and_broadcast() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(4);
    let a = rng.tensor(&[2, 5, 6, 7]);
    for bshape in [
        &[2, 5, 6, 7][..],
        &[7],
        &[1, 7],
        &[6, 7],
        &[1, 1, 6, 7],
        &[5, 6, 7],
        &[1, 2, 5, 6, 7],
        &[1],
        &[1, 1],
    ] {
        let b = rng.tensor(bshape);
        let y = cpu.add_scaled(&a, 0.5, &b, -2.0).unwrap();
        let nb = b.numel();
        let want: Vec<f64> = (0..a.numel())
            .map(|i| 0.5 * a.data()[i] as f64 - 2.0 * b.data()[i % nb] as f64)
            .collect();
        assert_close(
            &format!("add_scaled b {bshape:?}"),
            &y,
            a.shape(),
            &want,
            1e-6,
        );
    }
    // Large, to exercise the parallel path.
    let a = rng.tensor(&[64, 64, 96]);
    let b = rng.tensor(&[64, 64, 96]);
    let y = cpu.add_scaled(&a, 1.0, &b, 1.0).unwrap();
    let want: Vec<f64> = a
        .data()
        .iter()
        .zip(b.data())
        .map(|(&x, &z)| x as f64 + z as f64)
        .collect();
    assert_close("add_scaled large", &y, a.shape(), &want, 1e-6);
    for bshape in [&[96][..], &[1], &[3, 64, 96], &[7 * 64 * 96]] {
        let shape_a: &[usize] = if bshape == [7 * 64 * 96] {
            &[3, 7 * 64 * 96]
        } else {
            a.shape()
        };
        let a = rng.tensor(shape_a);
        let b = rng.tensor(bshape);
        if bshape == [3, 64, 96] {
            // Not a suffix of [64, 64, 96].
            assert!(cpu.add_scaled(&a, 1.0, &b, 3.0).is_err());
            continue;
        }
        let y = cpu.add_scaled(&a, 1.0, &b, 3.0).unwrap();
        let nb = b.numel();
        let want: Vec<f64> = (0..a.numel())
            .map(|i| a.data()[i] as f64 + 3.0 * b.data()[i % nb] as f64)
            .collect();
        assert_close(
            &format!("add_scaled large b {bshape:?}"),
            &y,
            a.shape(),
            &want,
            1e-6,
        );
    }
    for bad in [&[6][..], &[5, 7], &[2, 7], &[3, 6, 7]] {
        assert!(
            cpu.add_scaled(&rng.tensor(&[2, 5, 6, 7]), 1.0, &rng.tensor(bad), 1.0)
                .is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn activations() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    for n in [7usize, 1000, 100_003] {
        let x = Tensor::from_vec((0..n).map(|_| rng.uniform() * 8.0).collect(), &[n]).unwrap();
        let y = cpu.activate(&x, Act::Gelu).unwrap();
        let want: Vec<f64> = x.data().iter().map(|&v| gelu_ref(v as f64)).collect();
        assert_close("gelu", &y, &[n], &want, 1e-6);
        let y = cpu.activate(&x, Act::Relu).unwrap();
        let want: Vec<f64> = x.data().iter().map(|&v| (v as f64).max(0.0)).collect();
        assert_close("relu", &y, &[n], &want, 0.0);
        let y = cpu.activate(&x, Act::None).unwrap();
        assert_close("identity", &y, &[n], &f64s(&x), 0.0);
    }
}

// ----- linear algebra -------------------------------------------------------------------------

fn linear_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Vec<f64> {
    let k = w.shape()[1];
    let n = w.shape()[0];
    let m = x.numel() / k;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = b.map_or(0.0, |b| b.data()[j] as f64);
            for kk in 0..k {
                acc += x.data()[i * k + kk] as f64 * w.data()[j * k + kk] as f64;
            }
            out[i * n + j] = match act {
                Act::None => acc,
                Act::Relu => acc.max(0.0),
                Act::Gelu => gelu_ref(acc),
            };
        }
    }
    out
}

#[test]
fn linear_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(6);
    for &(lead, k, n, bias, act) in &[
        (&[3usize, 5][..], 7usize, 9usize, true, Act::None),
        (&[1, 1], 1, 1, false, Act::None),
        (&[2, 33], 64, 40, true, Act::Gelu),
        (&[130], 96, 257, true, Act::Relu),
        (&[1, 200], 768, 300, false, Act::Gelu),
        (&[4], 3, 2, false, Act::Relu),
    ] {
        let mut xs = lead.to_vec();
        xs.push(k);
        let x = rng.tensor(&xs);
        let w = rng.tensor(&[n, k]);
        let b = rng.tensor(&[n]);
        let bo = bias.then_some(&b);
        let y = cpu.linear(&x, &w, bo, act).unwrap();
        let mut ys = lead.to_vec();
        ys.push(n);
        assert_close(
            &format!("linear {xs:?} x [{n},{k}] {act:?}"),
            &y,
            &ys,
            &linear_ref(&x, &w, bo, act),
            1e-5,
        );
    }
    assert!(cpu
        .linear(&rng.tensor(&[2, 3]), &rng.tensor(&[4, 5]), None, Act::None)
        .is_err());
    assert!(cpu
        .linear(
            &rng.tensor(&[2, 3]),
            &rng.tensor(&[4, 3]),
            Some(&rng.tensor(&[3])),
            Act::None
        )
        .is_err());
}

#[test]
fn matmul_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(7);
    for &(bt, m, k, n) in &[
        (1usize, 1usize, 1usize, 1usize),
        (3, 5, 7, 9),
        (2, 64, 33, 70),
        (8, 40, 32, 40),
        (1, 150, 200, 130),
    ] {
        for trans_b in [false, true] {
            let a = rng.tensor(&[bt, m, k]);
            let b = if trans_b {
                rng.tensor(&[bt, n, k])
            } else {
                rng.tensor(&[bt, k, n])
            };
            let y = cpu.matmul(&a, &b, trans_b).unwrap();
            let mut want = vec![0.0; bt * m * n];
            for t in 0..bt {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0.0;
                        for kk in 0..k {
                            let bv = if trans_b {
                                b.data()[(t * n + j) * k + kk]
                            } else {
                                b.data()[(t * k + kk) * n + j]
                            };
                            acc += a.data()[(t * m + i) * k + kk] as f64 * bv as f64;
                        }
                        want[(t * m + i) * n + j] = acc;
                    }
                }
            }
            assert_close(
                &format!("matmul {bt}x{m}x{k}x{n} t={trans_b}"),
                &y,
                &[bt, m, n],
                &want,
                1e-5,
            );
        }
    }
    assert!(cpu
        .matmul(&rng.tensor(&[2, 3, 4]), &rng.tensor(&[2, 5, 6]), false)
        .is_err());
    assert!(cpu
        .matmul(&rng.tensor(&[2, 3, 4]), &rng.tensor(&[1, 4, 6]), false)
        .is_err());
}

#[test]
fn layer_norm_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(8);
    for &(shape, offset) in &[
        (&[3usize, 5, 7][..], 0.0f32),
        (&[2, 768], 0.0),
        (&[4096, 256], 0.0),
        (&[10, 33], 1000.0),
        (&[1, 1], 0.0),
    ] {
        let x0 = rng.tensor(shape);
        let x = Tensor::from_vec(x0.data().iter().map(|&v| v + offset).collect(), shape).unwrap();
        let c = *shape.last().unwrap();
        let g = rng.tensor(&[c]);
        let b = rng.tensor(&[c]);
        let y = cpu.layer_norm(&x, &g, &b, 1e-6).unwrap();
        let mut want = vec![0.0; x.numel()];
        for r in 0..x.numel() / c {
            let row: Vec<f64> = x.data()[r * c..(r + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            for i in 0..c {
                want[r * c + i] =
                    (row[i] - mean) / (var + 1e-6).sqrt() * g.data()[i] as f64 + b.data()[i] as f64;
            }
        }
        // With a mean of 1000, the input itself carries f32 rounding of ~3e-5 (x itself is
        // rounded), which the normalisation magnifies by 1/std ~ 1.7.
        let atol = if offset != 0.0 { 2e-4 } else { 1e-5 };
        assert_close(
            &format!("layer_norm {shape:?} +{offset}"),
            &y,
            shape,
            &want,
            atol,
        );
    }
    assert!(cpu
        .layer_norm(
            &rng.tensor(&[2, 4]),
            &rng.tensor(&[3]),
            &rng.tensor(&[4]),
            1e-5
        )
        .is_err());
}

// ----- attention ------------------------------------------------------------------------------

#[test]
fn attention_plain_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(9);
    for &(b, lq, lk, heads, d) in &[
        (1usize, 5usize, 5usize, 1usize, 2usize),
        (2, 7, 300, 8, 16),
        (1, 300, 7, 8, 16),
        (1, 200, 200, 3, 80),
        (3, 33, 65, 2, 7),
        (1, 257, 129, 2, 64),
        (1, 1, 1, 4, 3),
    ] {
        let q = rng.tensor(&[b, lq, heads * d]);
        let k = rng.tensor(&[b, lk, heads * d]);
        let v = rng.tensor(&[b, lk, heads * d]);
        // A large scale makes the softmax peaky, which exercises the max subtraction.
        for scale in [1.0 / (d as f32).sqrt(), 4.0] {
            let y = cpu.attention(&q, &k, &v, heads, scale, None).unwrap();
            let want = attention_ref(&q, &k, &v, heads, scale as f64, None);
            assert_close(
                &format!("attention b{b} lq{lq} lk{lk} h{heads} d{d} s{scale}"),
                &y,
                &[b, lq, heads * d],
                &want,
                1e-5,
            );
        }
    }
    let t = rng.tensor(&[1, 4, 6]);
    assert!(cpu.attention(&t, &t, &t, 4, 1.0, None).is_err());
    assert!(cpu
        .attention(&t, &rng.tensor(&[1, 4, 8]), &t, 2, 1.0, None)
        .is_err());
    assert!(cpu
        .attention(&t, &t, &rng.tensor(&[1, 5, 6]), 2, 1.0, None)
        .is_err());
}

#[test]
fn attention_rel_pos_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(10);
    for &(b, (qh, qw), (kh, kw), heads, d) in &[
        (2usize, (3usize, 4usize), (3usize, 4usize), 2usize, 8usize),
        (1, (14, 14), (14, 14), 3, 64),
        (1, (5, 7), (4, 6), 1, 5),
        (1, (16, 16), (16, 16), 2, 32),
        (2, (2, 3), (9, 11), 2, 2),
    ] {
        let (lq, lk) = (qh * qw, kh * kw);
        let q = rng.tensor(&[b, lq, heads * d]);
        let k = rng.tensor(&[b, lk, heads * d]);
        let v = rng.tensor(&[b, lk, heads * d]);
        let rh = rng.tensor(&[qh, kh, d]);
        let rw = rng.tensor(&[qw, kw, d]);
        let scale = 1.0 / (d as f32).sqrt();
        let rel = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (qh, qw),
            k_grid: (kh, kw),
        };
        let y = cpu.attention(&q, &k, &v, heads, scale, Some(rel)).unwrap();
        let want = attention_ref(
            &q,
            &k,
            &v,
            heads,
            scale as f64,
            Some((&rh, &rw, (qh, qw), (kh, kw))),
        );
        assert_close(
            &format!("attention rel {qh}x{qw} -> {kh}x{kw} h{heads} d{d}"),
            &y,
            &[b, lq, heads * d],
            &want,
            1e-5,
        );
        let bad = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (qw, qh + 1),
            k_grid: (kh, kw),
        };
        assert!(cpu.attention(&q, &k, &v, heads, scale, Some(bad)).is_err());
    }
}

// ----- convolutions ---------------------------------------------------------------------------

#[test]
fn conv2d_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(11);
    for &(b, h, w, cin, cout, k, stride, pad, bias) in &[
        (
            1usize, 9usize, 11usize, 3usize, 5usize, 3usize, 1usize, 1usize, true,
        ),
        (2, 9, 11, 4, 6, 3, 2, 1, false),
        (1, 8, 8, 7, 9, 1, 1, 0, true),
        (2, 5, 6, 16, 3, 1, 2, 0, false),
        (1, 64, 48, 3, 32, 16, 16, 0, true),
        (1, 10, 10, 2, 4, 2, 2, 0, true),
        (1, 7, 5, 3, 2, 5, 1, 2, true),
        (1, 6, 6, 3, 3, 3, 3, 2, false),
        (1, 1, 1, 2, 3, 3, 1, 1, true),
    ] {
        let x = rng.tensor(&[b, h, w, cin]);
        let wt = rng.tensor(&[cout, cin, k, k]);
        let bt = rng.tensor(&[cout]);
        let bo = bias.then_some(&bt);
        let y = cpu.conv2d(&x, &wt, bo, stride, pad).unwrap();
        let (ws, want) = conv2d_ref(&x, &wt, bo, stride, pad);
        assert_close(
            &format!("conv2d {h}x{w}x{cin}->{cout} k{k} s{stride} p{pad}"),
            &y,
            &ws,
            &want,
            1e-5,
        );
    }
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 4, 4, 3]),
            &rng.tensor(&[2, 4, 3, 3]),
            None,
            1,
            1
        )
        .is_err());
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[2, 3, 5, 5]),
            None,
            1,
            0
        )
        .is_err());
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 4, 4, 3]),
            &rng.tensor(&[2, 3, 3, 3]),
            Some(&rng.tensor(&[3])),
            1,
            1
        )
        .is_err());
}

#[test]
fn conv_transpose2x2_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(12);
    for &(b, h, w, cin, cout) in &[
        (1usize, 3usize, 4usize, 5usize, 7usize),
        (2, 8, 8, 32, 16),
        (1, 1, 1, 1, 1),
        (1, 16, 16, 64, 32),
    ] {
        let x = rng.tensor(&[b, h, w, cin]);
        let wt = rng.tensor(&[cin, cout, 2, 2]);
        let bt = rng.tensor(&[cout]);
        let y = cpu.conv_transpose2x2(&x, &wt, &bt).unwrap();
        let mut want = vec![0.0; b * 4 * h * w * cout];
        for bi in 0..b {
            for i in 0..h {
                for j in 0..w {
                    for di in 0..2 {
                        for dj in 0..2 {
                            for o in 0..cout {
                                let mut acc = bt.data()[o] as f64;
                                for c in 0..cin {
                                    acc += x.data()[((bi * h + i) * w + j) * cin + c] as f64
                                        * wt.data()[((c * cout + o) * 2 + di) * 2 + dj] as f64;
                                }
                                want[((bi * 2 * h + 2 * i + di) * 2 * w + 2 * j + dj) * cout + o] =
                                    acc;
                            }
                        }
                    }
                }
            }
        }
        assert_close(
            &format!("conv_transpose2x2 {h}x{w}x{cin}->{cout}"),
            &y,
            &[b, 2 * h, 2 * w, cout],
            &want,
            1e-5,
        );
    }
    assert!(cpu
        .conv_transpose2x2(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[4, 2, 2, 2]),
            &rng.tensor(&[2])
        )
        .is_err());
    assert!(cpu
        .conv_transpose2x2(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[3, 2, 2, 2]),
            &rng.tensor(&[3])
        )
        .is_err());
}

// ----- resampling -----------------------------------------------------------------------------

#[test]
fn resize_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(13);
    for &(b, c, h, w, oh, ow) in &[
        (1usize, 1usize, 4usize, 4usize, 8usize, 8usize),
        (2, 3, 5, 7, 11, 3),
        (1, 2, 64, 64, 256, 256),
        (1, 1, 256, 200, 64, 50),
        (1, 3, 9, 9, 9, 9),
        (1, 1, 1, 1, 3, 2),
        (1, 2, 6, 10, 4, 17),
    ] {
        let x = rng.tensor(&[b, c, h, w]);
        let y = cpu.resize_bilinear(&x, (oh, ow)).unwrap();
        assert_close(
            &format!("bilinear {h}x{w}->{oh}x{ow}"),
            &y,
            &[b, c, oh, ow],
            &bilinear_ref(&x, oh, ow),
            1e-6,
        );
        let y = cpu.resize_bicubic(&x, (oh, ow)).unwrap();
        assert_close(
            &format!("bicubic {h}x{w}->{oh}x{ow}"),
            &y,
            &[b, c, oh, ow],
            &bicubic_ref(&x, oh, ow),
            1e-6,
        );
    }
    assert!(cpu
        .resize_bilinear(&rng.tensor(&[1, 4, 4]), (2, 2))
        .is_err());
    assert!(cpu
        .resize_bicubic(&rng.tensor(&[1, 1, 4, 4]), (0, 2))
        .is_err());
}

#[test]
fn resize_known_values_ramp() {
    let cpu = Cpu::new();
    let ramp = Tensor::from_vec(vec![0.0, 1.0, 2.0, 3.0], &[1, 1, 1, 4]).unwrap();
    // Bilinear 2x: src = o/2 - 1/4, clamped at 0 on the left and at the last tap on the right.
    let y = cpu.resize_bilinear(&ramp, (1, 8)).unwrap();
    exact(
        "bilinear ramp x2",
        &y,
        &[1, 1, 1, 8],
        &[0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0],
    );
    // Bilinear 0.5x: src = 2o + 1/2 -> midpoints 0.5, 2.5.
    let y = cpu.resize_bilinear(&ramp, (1, 2)).unwrap();
    exact("bilinear ramp /2", &y, &[1, 1, 1, 2], &[0.5, 2.5]);
    // Bicubic 2x, by hand. With t the fractional source position, the four taps i-1..i+2 get
    // weights far(t+1), near(t), near(1-t), far(2-t), where near(x) = (1.25x - 2.25)x^2 + 1 and
    // far(x) = -0.75x^3 + 3.75x^2 - 6x + 3:
    //   t = 0.25: far(1.25) = -0.10546875, near(0.25) = 0.87890625, near(0.75) = 0.26171875,
    //             far(1.75) = -0.03515625 (they sum to 1);
    //   t = 0.75: the same four weights reversed.
    // o = 0: src = -0.25 (not clamped), i = -1, t = 0.75, taps -2..1 clamp to 0,0,0,1 -> values
    //        0,0,0,1, so y = far(1.25) = -0.10546875.
    // o = 1: src = 0.25, taps -1..2 clamp to 0,0,1,2: 0.26171875 - 2 * 0.03515625 = 0.19140625.
    // o = 2: src = 0.75: 0.87890625 - 2 * 0.10546875 = 0.66796875 (the clamped left tap pulls
    //        it below the ramp's 0.75).
    // o = 3: src = 1.25, taps 0..3 all interior: 0.87890625 + 2 * 0.26171875 - 3 * 0.03515625
    //        = 1.296875 (not 1.25: with A = -0.75 the kernel's first moment is 0.296875, not t;
    //        only A = -0.5 reproduces linear functions).
    // o = 5..7 mirror o = 2..0 about 1.5: 3 - y.
    let left = [-0.10546875f32, 0.19140625, 0.66796875, 1.296875];
    let want: Vec<f32> = left
        .iter()
        .copied()
        .chain(left.iter().rev().map(|v| 3.0 - v))
        .collect();
    let y = cpu.resize_bicubic(&ramp, (1, 8)).unwrap();
    exact("bicubic ramp x2", &y, &[1, 1, 1, 8], &want);
}

/// The fused-op cases of the device self-test run on the CPU too (CPU against itself): every
/// case builds and runs, so a device session spends its minutes on the kernels, not on
/// malformed cases.
#[test]
fn selftest_fused_cases_run_on_the_cpu() {
    let checks = medsa::selftest::fused_ops(&Cpu::new(), medsa::selftest::Tolerance::F32);
    assert_eq!(checks.len(), 4 + 3 * 2 + 5 + 4);
    assert_eq!(medsa::selftest::report(&checks), 0);
}

/// The CPU's windowed attention (padding rows written by the partition) equals the generic
/// sequence of `backend::fused` (zero padding, then an exact outer-product fill) bit for bit, on
/// maps padded on one axis, on both, and not at all.
#[test]
fn windowed_attention_override_equals_the_plain_sequence() {
    let be = Cpu::new();
    let mut rng = Rng::new(31);
    for (n, h, w, ws) in [(2, 7, 5, 3), (1, 6, 9, 3), (1, 8, 8, 4)] {
        let (heads, d) = (2, 8);
        let c3 = 3 * heads * d;
        let qkv = rng.tensor(&[n, h, w, c3]);
        let pad = rng.tensor(&[c3]);
        let rh = rng.tensor(&[ws, ws, d]);
        let rw = rng.tensor(&[ws, ws, d]);
        let rel = || Some(RelPos::within(&rh, &rw, (ws, ws)));
        let a = be
            .attention_qkv_windowed(&qkv, &pad, ws, heads, 0.35, rel())
            .unwrap();
        let b =
            medsa::backend::fused::attention_qkv_windowed(&be, &qkv, &pad, ws, heads, 0.35, rel())
                .unwrap();
        assert_eq!(a.shape(), &[n, h, w, heads * d]);
        assert_eq!(a.data(), b.data(), "{n}x{h}x{w} ws {ws}");
    }
}
