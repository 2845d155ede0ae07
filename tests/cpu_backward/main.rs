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

mod activations;
mod attention;
mod convolutions;
mod layer_norm;
mod sum_rows_and_linear;
mod trait_defaults;

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::sam::random::Rng;
use medsa::Tensor;

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
