//! Both kernels against the scalar definition, bit for bit, on shapes with partial tiles, odd
//! reductions, transposed operands, accumulation and the parallel split.

use super::*;

/// xorshift values over a wide exponent range, a few of them tiny enough that products and
/// sums fall below f32's normal range (the flush-to-zero steps).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            match i % 97 {
                0 => u * 1e-30,
                1 => u * 1e-20,
                2 => u * 1e20,
                _ => u * (1.0 + (s % 5) as f32),
            }
        })
        .collect()
}

fn kernels() -> Vec<Bf16Kernel> {
    let mut v = vec![Bf16Kernel::Portable];
    if Bf16Kernel::Avx512Bf16.available() {
        v.push(Bf16Kernel::Avx512Bf16);
    } else {
        eprintln!("skip: this CPU has no AVX512-BF16; only the portable kernel is checked");
    }
    v
}

/// `(m, n, k, transposed rhs, accumulate, scale, parallel)`.
type Case = (usize, usize, usize, bool, bool, f32, bool);

fn check(kernel: Bf16Kernel, case: Case) {
    let (m, n, k, trans, accumulate, scale, parallel) = case;
    let a = values(m * k, 1 + m as u64);
    let b = values(k * n, 2 + n as u64);
    let lhs = Mat {
        ptr: a.as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    // Transposed: b holds n x k row-major, read as k x n.
    let rhs = if trans {
        Mat {
            ptr: b.as_ptr(),
            rs: 1,
            cs: k as isize,
        }
    } else {
        Mat {
            ptr: b.as_ptr(),
            rs: n as isize,
            cs: 1,
        }
    };
    let ld = n + 3;
    let init = values(m * ld, 3);
    let (mut want, mut got) = (init.clone(), init);
    let par = if parallel {
        Parallelism::Rayon(2)
    } else {
        Parallelism::None
    };
    // SAFETY: the buffers hold exactly the described extents.
    unsafe {
        reference(m, n, k, want.as_mut_ptr(), ld, accumulate, lhs, rhs, scale);
        gemm(
            kernel,
            m,
            n,
            k,
            got.as_mut_ptr(),
            ld,
            accumulate,
            lhs,
            rhs,
            scale,
            par,
        );
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{kernel:?} {case:?}: element {i} ({}, {}) is {g:e}, the definition gives {w:e}",
            i / ld,
            i % ld
        );
    }
}

#[test]
fn kernels_match_the_definition_bit_for_bit() {
    let cases: [Case; 9] = [
        (1, 1, 1, false, false, 1.0, false),
        (12, 32, 2, false, false, 1.0, false),
        (13, 33, 7, true, false, 1.0, false),
        (5, 70, 64, true, true, 0.125, false),
        (30, 17, 129, false, true, -2.0, false),
        (128, 64, 64, true, false, 0.125, false),
        (100, 96, 300, true, false, 1.0, true),
        (61, 300, 77, false, true, 0.5, true),
        (7, 5, 0, false, true, 1.0, false),
    ];
    // Tall enough for the per-row-block split (at least 4 blocks per thread), with a partial
    // last block.
    let tall = MC_TALL * 4 * rayon::current_num_threads() + 5;
    for kernel in kernels() {
        for case in cases {
            check(kernel, case);
        }
        check(kernel, (tall, 40, 70, true, true, 0.5, true));
    }
}

#[test]
fn rounding_is_to_nearest_even_with_nan_kept_and_subnormals_flushed() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even (1.0).
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3 * 2^-8 is halfway up from an odd mantissa: rounds up.
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(to_bf16(-1.0 - 1.0 / 128.0 - 1.0 / 1024.0), 0xbf81);
    assert_eq!(
        to_bf16(f32::MAX),
        0x7f80,
        "rounds past the largest bf16 to infinity"
    );
    assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    // A NaN whose payload sits in the low 16 bits must not round to infinity.
    assert!(from_bf16(to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
    assert_eq!(to_bf16(1e-39), 0, "an f32 subnormal flushes to zero");
    assert_eq!(to_bf16(-1e-39), 0x8000, "keeping its sign");
    assert_eq!(
        to_bf16(f32::MIN_POSITIVE),
        0x0080,
        "the smallest normal stays"
    );
}

#[test]
fn dispatch_picks_what_the_cpu_reports() {
    let k = Bf16Kernel::detect();
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        k == Bf16Kernel::Avx512Bf16,
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    );
    assert!(k.available());
    assert!(Bf16Kernel::Portable.available());
    assert!(!k.describe().is_empty());
}

#[test]
fn nan_and_infinity_propagate() {
    let mut a = [1.0f32; 4 * 6];
    a[7] = f32::NAN;
    let b = [1.0f32; 6 * 3];
    let mut out = [0.0f32; 4 * 3];
    for kernel in kernels() {
        // SAFETY: the buffers hold exactly the described extents.
        unsafe {
            gemm(
                kernel,
                4,
                3,
                6,
                out.as_mut_ptr(),
                3,
                false,
                Mat {
                    ptr: a.as_ptr(),
                    rs: 6,
                    cs: 1,
                },
                Mat {
                    ptr: b.as_ptr(),
                    rs: 3,
                    cs: 1,
                },
                1.0,
                Parallelism::None,
            );
        }
        assert!(out[3..6].iter().all(|v| v.is_nan()), "{kernel:?}: {out:?}");
        assert!(out[..3].iter().all(|&v| v == 6.0), "{kernel:?}: {out:?}");
    }
}

#[test]
fn vector_conversion_matches_the_scalar_one() {
    if !Bf16Kernel::Avx512Bf16.available() {
        eprintln!("skip: this CPU has no AVX512-BF16");
        return;
    }
    let mut src: Vec<f32> = [
        0x7f80_0001u32, // NaN with a low payload
        0xffc0_0000,    // negative quiet NaN
        0x7f80_0000,    // inf
        0xff80_0000,    // -inf
        0x7f7f_ffff,    // rounds up to inf
        0x007f_ffff,    // largest subnormal: rounds up to the smallest normal
        0x0000_0001,    // smallest subnormal
        0x8040_0000,    // negative subnormal
        0x3f80_8000,    // tie to even (down)
        0x3f81_8000,    // tie to even (up)
        0x3f80_8001,    // just above the tie
        0x0080_0000,    // smallest normal
        0x8000_0000,    // -0
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    src.extend(values(64 - src.len() + 7, 9));
    let mut got = vec![0u32; src.len() / 2];
    // SAFETY: the CPU has AVX512-BF16 (checked above), hence AVX512BW.
    let done = unsafe { avx512::convert_pairs(&src, &mut got) };
    assert_eq!(done, 32);
    for p in 0..done {
        assert_eq!(
            got[p],
            pair(src[2 * p], src[2 * p + 1]),
            "pair {p}: {:e}, {:e}",
            src[2 * p],
            src[2 * p + 1]
        );
    }
}
