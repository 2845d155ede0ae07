//! Op-by-op parity of the CUDA backward ops with the CPU reference: one list of checks per op
//! (activations, `sum_rows`, linear, LayerNorm, attention, convolutions), each run as an f32 and a
//! bf16 test.

use medsa::backend::cuda::{Cuda, Precision};
use medsa::backend::{Act, Backend};
use medsa::sam::random::Rng;
use medsa::selftest::{Check, Tolerance};

use super::{attn_backward, attn_inputs, attn_name, fail, parity, run, AttnCase};

fn activate_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(11);
    let mut out = Vec::new();
    for n in [1001usize, 1, 70_000] {
        for act in [Act::Gelu, Act::Relu, Act::None] {
            let ins = [rng.tensor(&[n], 4.0), rng.tensor(&[n], 1.0)];
            out.extend(parity(
                be,
                &format!("activate_backward {act:?} n{n}"),
                &["dx"],
                &ins,
                tol,
                &|b, x| Ok(vec![b.activate_backward(&x[0], &x[1], act)?]),
                &|b, x| Ok(vec![b.activate_backward(&x[0], &x[1], act)?]),
            ));
        }
    }
    out
}

fn sum_rows_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(12);
    let mut out = Vec::new();
    for (shape, cols) in [
        (vec![37, 50], 50),
        (vec![4097, 3], 3),
        (vec![1, 7], 7),
        (vec![2, 64, 64, 256], 256),
        (vec![20_000, 33], 33),
        (vec![6, 5, 4], 20),
    ] {
        let ins = [rng.tensor(&shape, 1.0)];
        out.extend(parity(
            be,
            &format!("sum_rows {shape:?} cols {cols}"),
            &["y"],
            &ins,
            tol,
            &|b, x| Ok(vec![b.sum_rows(&x[0], cols)?]),
            &|b, x| Ok(vec![b.sum_rows(&x[0], cols)?]),
        ));
    }
    out
}

fn linear_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(13);
    let mut out = Vec::new();
    for (lead, k, n) in [
        (vec![37], 50, 70),
        (vec![1], 3, 1),
        (vec![2, 64], 768, 2304),
        (vec![3, 5, 7], 33, 17),
    ] {
        let rows: usize = lead.iter().product();
        let mut xs = lead.clone();
        xs.push(k);
        let mut ys = lead.clone();
        ys.push(n);
        let ins = [
            rng.tensor(&ys, 1.0),
            rng.tensor(&[n, k], 1.0 / (k as f32).sqrt()),
        ];
        out.extend(parity(
            be,
            &format!("linear_backward_input dy {ys:?} w [{n}, {k}]"),
            &["dx"],
            &ins,
            tol,
            &|b, x| Ok(vec![b.linear_backward_input(&x[0], &x[1])?]),
            &|b, x| Ok(vec![b.linear_backward_input(&x[0], &x[1])?]),
        ));
        let ins = [rng.tensor(&xs, 1.0), rng.tensor(&ys, 1.0)];
        for bias in [true, false] {
            let labels: &[&str] = if bias { &["dw", "db"] } else { &["dw"] };
            out.extend(parity(
                be,
                &format!("linear_backward_weight x {xs:?} dy {ys:?} ({rows} rows) bias {bias}"),
                labels,
                &ins,
                tol,
                &|b, x| {
                    let (dw, db) = b.linear_backward_weight(&x[0], &x[1], bias)?;
                    Ok(std::iter::once(dw).chain(db).collect())
                },
                &|b, x| {
                    let (dw, db) = b.linear_backward_weight(&x[0], &x[1], bias)?;
                    Ok(std::iter::once(dw).chain(db).collect())
                },
            ));
        }
    }
    out
}

fn layer_norm_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(14);
    let mut out = Vec::new();
    // C = 768 / 256 (SAM), 33 (odd), 1, 2500 (past the kernel's register cache of 2048);
    // 5000 rows: more rows than CTAs, so each CTA reduces several rows into its partials.
    for (rows, c) in [
        (300, 768),
        (5000, 256),
        (13, 33),
        (5, 1),
        (3, 2500),
        (1, 768),
    ] {
        let ins = [
            rng.tensor(&[rows, c], 3.0),
            rng.tensor(&[c], 1.0),
            rng.tensor(&[rows, c], 1.0),
        ];
        for eps in [1e-6f32, 1e-5] {
            out.extend(parity(
                be,
                &format!("layer_norm_backward {rows}x{c} eps {eps:e}"),
                &["dx", "dg", "db"],
                &ins,
                tol,
                &|b, x| {
                    let (dx, dg, db) = b.layer_norm_backward(&x[0], &x[1], &x[2], eps)?;
                    Ok(vec![dx, dg, db])
                },
                &|b, x| {
                    let (dx, dg, db) = b.layer_norm_backward(&x[0], &x[1], &x[2], eps)?;
                    Ok(vec![dx, dg, db])
                },
            ));
        }
    }
    out
}

const ATTN_CASES: &[AttnCase] = &[
    // rel-pos on an 8x8 grid (one whole 64-key tile per row, kw < 64)
    (2, 2, 64, (8, 8), (8, 8), true),
    // SAM's windowed attention: 14x14 windows, d = 64 (vit_b) and d = 80 (vit_h), 2 / 12 heads
    (2, 2, 64, (14, 14), (14, 14), true),
    (1, 12, 64, (14, 14), (14, 14), true),
    (1, 2, 80, (14, 14), (14, 14), true),
    (1, 12, 80, (14, 14), (14, 14), true),
    // global-attention shape class: kw = 64 (every key tile is one ky)
    (1, 2, 64, (4, 64), (4, 64), true),
    // non-square and different query / key grids, odd head dims (SIMT buckets 16, 32, 128)
    (1, 2, 16, (5, 7), (5, 7), true),
    (1, 2, 24, (4, 5), (6, 7), true),
    (1, 3, 33, (3, 9), (7, 3), true),
    (1, 1, 128, (9, 10), (9, 10), true),
    // kh + kw = 400 with d = 128: the dq kernel's rel-pos accumulator does not fit in shared
    // memory (A100 / H100 / H200), so its row sums go through global memory (the other path)
    (1, 2, 100, (2, 200), (2, 200), true),
    // no bias, Lq != Lk, sizes that are not tile multiples, tiny dims (the mask decoder)
    (2, 3, 16, (37, 1), (53, 1), false),
    (2, 8, 32, (7, 1), (256, 1), false),
    (2, 8, 16, (256, 1), (7, 1), false),
    (1, 8, 4, (5, 1), (5, 1), false),
    (1, 1, 128, (130, 1), (65, 1), false),
    (1, 1, 1, (1, 1), (1, 1), false),
];

fn attention_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(15);
    let mut out = Vec::new();
    for case in ATTN_CASES {
        let name = attn_name(case);
        let ins = match attn_inputs(&mut rng, case) {
            Ok(i) => i,
            Err(e) => {
                out.push(fail(&name, e));
                continue;
            }
        };
        let labels: &[&str] = if case.5 {
            &["dq", "dk", "dv", "drh", "drw"]
        } else {
            &["dq", "dk", "dv"]
        };
        out.extend(parity(
            be,
            &name,
            labels,
            &ins,
            tol,
            &|b, x| attn_backward(b, x, case),
            &|b, x| attn_backward(b, x, case),
        ));
    }
    out
}

fn conv_checks(be: &Cuda, tol: Tolerance) -> Vec<Check> {
    let mut rng = Rng::new(16);
    let mut out = Vec::new();
    for (s, w, stride, pad) in [
        // SAM's patch embedding: 16x16, stride 16
        (vec![1, 64, 48, 3], vec![8, 3, 16, 16], 16, 0),
        (vec![2, 32, 32, 3], vec![16, 3, 16, 16], 16, 0),
        // 3x3, pad 1 (the neck), stride 1 and 2, odd sizes
        (vec![2, 9, 11, 5], vec![7, 5, 3, 3], 1, 1),
        (vec![2, 9, 11, 5], vec![7, 5, 3, 3], 2, 1),
        (vec![1, 16, 16, 32], vec![24, 32, 3, 3], 1, 1),
        // 1x1 and 2x2 stride 2
        (vec![1, 8, 8, 6], vec![4, 6, 1, 1], 1, 0),
        (vec![2, 16, 16, 1], vec![4, 1, 2, 2], 2, 0),
    ] {
        let (bn, h, wd) = (s[0], s[1], s[2]);
        let ho = (h + 2 * pad - w[2]) / stride + 1;
        let wo = (wd + 2 * pad - w[3]) / stride + 1;
        let ins = [
            rng.tensor(&s, 1.0),
            rng.tensor(&w, 0.3),
            rng.tensor(&[bn, ho, wo, w[0]], 1.0),
        ];
        for (need_dx, bias) in [(true, true), (false, false)] {
            let mut labels = Vec::new();
            if need_dx {
                labels.push("dx");
            }
            labels.push("dw");
            if bias {
                labels.push("db");
            }
            out.extend(parity(
                be,
                &format!("conv2d_backward {s:?} {w:?} s{stride} p{pad} dx {need_dx} bias {bias}"),
                &labels,
                &ins,
                tol,
                &|b, x| {
                    let (dx, dw, db) =
                        b.conv2d_backward(&x[0], &x[1], &x[2], stride, pad, need_dx, bias)?;
                    Ok(dx.into_iter().chain([dw]).chain(db).collect())
                },
                &|b, x| {
                    let (dx, dw, db) =
                        b.conv2d_backward(&x[0], &x[1], &x[2], stride, pad, need_dx, bias)?;
                    Ok(dx.into_iter().chain([dw]).chain(db).collect())
                },
            ));
        }
    }
    let ins = [
        rng.tensor(&[2, 5, 6, 8], 1.0),
        rng.tensor(&[8, 4, 2, 2], 0.3),
        rng.tensor(&[2, 10, 12, 4], 1.0),
    ];
    out.extend(parity(
        be,
        "conv_transpose2x2_backward",
        &["dx", "dw", "db"],
        &ins,
        tol,
        &|b, x| {
            let (dx, dw, db) = b.conv_transpose2x2_backward(&x[0], &x[1], &x[2])?;
            Ok(vec![dx, dw, db])
        },
        &|b, x| {
            let (dx, dw, db) = b.conv_transpose2x2_backward(&x[0], &x[1], &x[2])?;
            Ok(vec![dx, dw, db])
        },
    ));
    out
}

macro_rules! parity_tests {
    ($($f32:ident, $bf16:ident => $checks:ident;)*) => {$(
        #[test]
        #[cfg_attr(
            medsa_no_cuda_tests,
            ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
        )]
        fn $f32() {
            run(Precision::F32, stringify!($checks), $checks);
        }
        #[test]
        #[cfg_attr(
            medsa_no_cuda_tests,
            ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
        )]
        fn $bf16() {
            run(Precision::Bf16, stringify!($checks), $checks);
        }
    )*};
}

parity_tests! {
    activate_backward_f32, activate_backward_bf16 => activate_checks;
    sum_rows_f32, sum_rows_bf16 => sum_rows_checks;
    linear_backward_f32, linear_backward_bf16 => linear_checks;
    layer_norm_backward_f32, layer_norm_backward_bf16 => layer_norm_checks;
    attention_backward_f32, attention_backward_bf16 => attention_checks;
    conv2d_backward_f32, conv2d_backward_bf16 => conv_checks;
}
