//! Vectorisable transcendental kernels over slices: `exp` (softmax) and `erf` (exact GELU).
//!
//! exp(x) = 2^n * e^r with n = round(x / ln2) and r = x - n ln2 (|r| <= ln2 / 2, Cody-Waite split
//! of ln2 so that n * ln2_hi is exact); e^r is a degree-7 Taylor polynomial (truncation < 6e-9),
//! and 2^n is built from exponent bits in two halves so that results down to the subnormal range
//! stay correctly scaled. Relative error is ~1 ulp on [-87, 88].
//!
//! erf(x) = x * P(x^2) for |x| < 1 (P: degree-6 Chebyshev interpolant of erf(x)/x in x^2, error
//! 1e-9) and 1 - exp(-x^2) * R(u) for 1 <= |x| < 4 with u = (2|x| - 5) / 3 (R: degree-11
//! interpolant of exp(x^2) erfc(x), error 4e-9); beyond 4, erf is 1 in f32. Absolute error is a
//! few 1e-8.
//!
//! Both are written branch-free (selects instead of branches, integer tricks instead of
//! `round`/`as` casts) so that LLVM vectorises the slice loops. The loops are compiled three times:
//! for AVX-512, for AVX2+FMA, and portably; the best one is chosen at run time. The `FMA` const
//! parameter picks fused multiply-adds, which are only fast where the target feature is enabled
//! (elsewhere `mul_add` is a libm call).

/// `a * b + c`, fused when `F` (only instantiated as `true` inside FMA-enabled functions).
#[inline(always)]
pub(crate) fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits so n * LN2_HI is exact for |n| < 2^15.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// 1.5 * 2^23: adding it rounds to an integer that lands in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
pub(crate) fn exp1<const F: bool>(x: f32) -> f32 {
    // Upper clamp keeps n <= 128 (so the result overflows to inf as it should); below -104 the
    // true value is under half the smallest subnormal.
    let xc = x.clamp(-104.0, 89.0);
    let t = madd::<F>(xc, LOG2E, ROUND_MAGIC);
    let n = t.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let nf = t - ROUND_MAGIC;
    let r = madd::<F>(nf, -LN2_HI, xc);
    let r = madd::<F>(nf, -LN2_LO, r);
    let mut p = 1.0 / 5040.0;
    p = madd::<F>(p, r, 1.0 / 720.0);
    p = madd::<F>(p, r, 1.0 / 120.0);
    p = madd::<F>(p, r, 1.0 / 24.0);
    p = madd::<F>(p, r, 1.0 / 6.0);
    p = madd::<F>(p, r, 0.5);
    p = madd::<F>(p, r, 1.0);
    p = madd::<F>(p, r, 1.0);
    // 2^n as 2^n1 * 2^n2 with both halves normal: a single 2^n would not be representable for
    // n < -126, where the result is subnormal.
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -104.0 {
        0.0
    } else {
        y
    }
}

// erf(x)/x = P(x^2) on |x| < 1, monomial coefficients in s = x^2 (lowest first).
const ERF_P: [f32; 7] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -0.376_126_27,
    0.112_835_95,
    -0.026_854_212,
    0.005_189_087_4,
    -0.000_801_686_4,
    7.875_875e-5,
];
// exp(x^2) erfc(x) = R(u) on 1 <= x <= 4, u = (2x - 5) / 3, monomial coefficients in u.
const ERF_R: [f32; 12] = [
    0.210_806_36,
    -0.111_521_02,
    0.056_110_95,
    -0.027_005_458,
    0.012_484_123,
    -0.005_568_837_6,
    0.002_425_639,
    -0.001_013_662_6,
    0.000_368_151_1,
    -0.000_147_416_14,
    9.629_12e-5,
    -3.566_418e-5,
];

#[inline(always)]
fn erf1<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    // Small branch: odd polynomial.
    let s = x * x;
    let mut p = ERF_P[6];
    for &c in ERF_P[..6].iter().rev() {
        p = madd::<F>(p, s, c);
    }
    let small = x * p;
    // Large branch: 1 - exp(-x^2) R(u); a is clamped so R stays in its fitted range (erfc(4) is
    // below f32 resolution at 1, so the clamp does not change the result).
    let ac = a.clamp(1.0, 4.0);
    let u = madd::<F>(ac, 2.0 / 3.0, -5.0 / 3.0);
    let mut r = ERF_R[11];
    for &c in ERF_R[..11].iter().rev() {
        r = madd::<F>(r, u, c);
    }
    let large = 1.0 - exp1::<F>(-(ac * ac)) * r;
    let large = if x < 0.0 { -large } else { large };
    if a < 1.0 {
        small
    } else {
        large
    }
}

#[inline(always)]
fn gelu1<const F: bool>(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf1::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Sum of a slice with 16 independent partial sums: a single accumulator would serialise the
/// loop on the add latency and forbid vectorisation.
#[inline(always)]
pub(crate) fn sum16(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// Maximum of a slice (-inf when empty), with 16 independent lanes so it vectorises (a plain
/// fold is a serial dependency chain). NaN inputs are ignored rather than propagated, which only
/// matters for a softmax that is NaN anyway.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(&acc) {
        m = if v > m { v } else { m };
    }
    m
}

/// Generates the runtime-dispatched public entry point and its three compiled variants. The body
/// is an `#[inline(always)]` function generic over `const F: bool` (use fused multiply-adds),
/// so plain loops in it are vectorised for the detected CPU (the crate itself is compiled for
/// baseline x86-64, i.e. SSE2).
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty, $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the required CPU features were detected at run time.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

#[inline(always)]
fn exp_body<const F: bool>(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1::<F>(*x);
    }
}

#[inline(always)]
fn erf_body<const F: bool>(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = erf1::<F>(*x);
    }
}

#[inline(always)]
fn gelu_body<const F: bool>(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = gelu1::<F>(*x);
    }
}

#[inline(always)]
fn exp_shift_sum_body<const F: bool>(xs: &mut [f32], shift: f32) -> f32 {
    for x in xs.iter_mut() {
        *x = exp1::<F>(*x - shift);
    }
    sum16(xs)
}

dispatch!(
    /// `x = exp(x)` elementwise, in place.
    pub fn exp_inplace(xs: &mut [f32]) -> (),
    exp_body
);
dispatch!(
    /// `x = erf(x)` elementwise, in place.
    pub fn erf_inplace(xs: &mut [f32]) -> (),
    erf_body
);
dispatch!(
    /// Exact GELU `x * 0.5 * (1 + erf(x / sqrt 2))` elementwise, in place.
    pub fn gelu_inplace(xs: &mut [f32]) -> (),
    gelu_body
);
dispatch!(
    /// `x = exp(x - shift)` in place; returns the sum of the results (the softmax denominator).
    pub fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f32,
    exp_shift_sum_body
);

#[cfg(test)]
mod tests {
    //! The integration tests exercise whichever variant this CPU dispatches to; these check the
    //! non-FMA (portable) arithmetic as well, which other machines may run.

    use super::*;

    fn erf_ref(x: f64) -> f64 {
        // All-positive series (no cancellation): 2/sqrt(pi) e^{-x^2} sum 2^n x^{2n+1} / (2n+1)!!.
        let a = x.abs().min(6.0);
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term > 1e-17 * sum {
            n += 1.0;
            term *= 2.0 * a * a / (2.0 * n + 1.0);
            sum += term;
        }
        (2.0 / std::f64::consts::PI.sqrt() * (-a * a).exp() * sum)
            .min(1.0)
            .copysign(x)
    }

    fn check<const F: bool>() {
        let n = 200_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            let want = (x as f64).exp();
            let got = exp1::<F>(x) as f64;
            assert!(
                (got - want).abs() <= 2e-7 * want,
                "exp({x}) = {got}, want {want} (F={F})"
            );
            let x = -7.0 + 14.0 * i as f32 / n as f32;
            let want = erf_ref(x as f64);
            let got = erf1::<F>(x) as f64;
            assert!(
                (got - want).abs() <= 2e-7,
                "erf({x}) = {got}, want {want} (F={F})"
            );
        }
    }

    #[test]
    fn portable_and_fused_variants_are_accurate() {
        check::<false>();
        // `mul_add` is exact whether or not the CPU has FMA (libm otherwise), so this runs
        // everywhere.
        check::<true>();
    }
}
