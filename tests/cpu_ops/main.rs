//! The CPU backend against naive, obviously-correct references (plain loops, f64 accumulation)
//! on seeded random inputs, plus hand-derived known values for the resizes and accuracy sweeps for
//! the vectorised exp / erf.
//!
//! Comparisons use `|got - want| <= atol + rtol * |want|` with rtol = 1e-4: the backend sums in
//! f32 in a different order than the f64 reference (blocked GEMM, vector partial sums), so long
//! reductions differ by a few f32 ulps times the sum length.

mod attention;
mod convolutions;
mod elementwise;
mod layout;
mod linear_algebra;
mod math_kernels;
mod resampling;

use medsa::backend::cpu::Cpu;
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

/// The fused-op cases of the device self-test run on the CPU too (CPU against itself): every
/// case builds and runs, so a device session spends its minutes on the kernels, not on
/// malformed cases.
#[test]
fn selftest_fused_cases_run_on_the_cpu() {
    let checks = medsa::selftest::fused_ops(&Cpu::new(), medsa::selftest::Tolerance::F32);
    // linear_residual, add_layer_norm (sum, norm) + layer_norm, windowed and depth attention
    // (each with arbitrary and with shift-invariant rel-pos tables)
    assert_eq!(checks.len(), 4 + 8 * 3 + 5 * 2 + 4 * 2);
    assert_eq!(medsa::selftest::report(&checks), 0);
}
