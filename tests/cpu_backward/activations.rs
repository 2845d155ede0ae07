//! `activate_backward` (GELU, ReLU, identity) against the f64 derivatives.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, Backend};
use medsa::sam::random::Rng;

use super::bitwise;

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
