//! The vectorised exp / erf of `cpu::math` against f64: accuracy sweeps over dense grids, edge
//! values, `exp_shift_sum`, and spot values of the test's own erf reference.

use medsa::backend::cpu::math;

use super::{erf_ref, Rng};

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
