//! The CUDA backward ops against the CPU reference (`medsa::backend::cpu::Cpu`), op by op, on
//! fresh random inputs, in f32 and bf16 storage; plus checks that need no reference: the CUDA
//! gradients against finite differences of the CPU forward, and bit-for-bit reproducibility.
//! Without a CUDA driver or device these tests print why and return (CI has no GPU;
//! `scripts/gpu-check.sh` runs them on one).
//!
//! Tolerances (`|got - want| <= atol_rms * rms(want) + rtol * |want|`, per tensor):
//! * f32: rtol 1e-4, atol 3e-4 of the rms. Both backends compute in f32 but reduce in another
//!   order; the backward outputs are differences of such reductions (attention's `dP - Dr`,
//!   LayerNorm's `dh - mean(dh) - xh mean(dh xh)`, `dS` row sums for the rel-pos terms), so the
//!   error is a few ulps of the terms, not of the (smaller) result.
//! * bf16: rtol 3e-2, atol 3e-2 of the rms (`Tolerance::BF16`). The reference sees the inputs as
//!   the device stores them (bf16-rounded), and every kernel computes in f32, so what is left is
//!   the rounding of each output to bf16 (2^-9 relative) and, for conv2d's dx, of the dcols GEMM
//!   output that col2im sums (<= kh*kw terms); 3e-2 leaves room for accumulated reductions
//!   without hiding indexing bugs (those give errors of the order of the values themselves).
#![cfg(feature = "cuda")]

use medsa::backend::cpu::Cpu;
use medsa::backend::cuda::{driver_present, Cuda, Precision};
use medsa::backend::{Act, Backend, RelPos};
use medsa::sam::random::Rng;
use medsa::selftest::{compare, report, Check, Tolerance};
use medsa::Tensor;

/// Writes straight to stderr: libtest captures `println!`, and a skip must be visible in CI logs.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "cuda_backward: SKIPPED: {why}");
}

fn device(p: Precision) -> Option<Cuda> {
    if !driver_present() {
        skip("no NVIDIA driver (libcuda.so) on this machine");
        return None;
    }
    match Cuda::new(0, p) {
        Ok(c) => Some(c),
        Err(e) => {
            skip(&format!("no usable CUDA device: {e}"));
            None
        }
    }
}

/// See the file header.
fn tol(p: Precision) -> Tolerance {
    match p {
        Precision::F32 => Tolerance {
            rtol: 1e-4,
            atol_rms: 3e-4,
        },
        Precision::Bf16 => Tolerance::BF16,
    }
}

fn fail(name: &str, e: impl std::fmt::Display) -> Check {
    Check {
        name: name.into(),
        ok: false,
        max_err_rel_rms: f32::INFINITY,
        detail: e.to_string(),
    }
}

type DevFn<'a> = &'a dyn Fn(
    &Cuda,
    &[<Cuda as Backend>::Tensor],
) -> medsa::Result<Vec<<Cuda as Backend>::Tensor>>;
type CpuFn<'a> = &'a dyn Fn(&Cpu, &[Tensor]) -> medsa::Result<Vec<Tensor>>;

/// Uploads `inputs`, runs `f_dev` on the device and `f_cpu` on the CPU with the inputs as the
/// device stores them, and compares output `i` under `labels[i]`.
fn parity(
    be: &Cuda,
    name: &str,
    labels: &[&str],
    inputs: &[Tensor],
    tol: Tolerance,
    f_dev: DevFn<'_>,
    f_cpu: CpuFn<'_>,
) -> Vec<Check> {
    let cpu = Cpu::new();
    let run = || -> medsa::Result<(Vec<Tensor>, Vec<Tensor>)> {
        let dev_in: Vec<_> = inputs
            .iter()
            .map(|t| be.upload(t))
            .collect::<medsa::Result<_>>()?;
        let cpu_in: Vec<Tensor> = dev_in
            .iter()
            .map(|t| be.download(t))
            .collect::<medsa::Result<_>>()?;
        let got = f_dev(be, &dev_in)?
            .iter()
            .map(|t| be.download(t))
            .collect::<medsa::Result<Vec<_>>>()?;
        let want = f_cpu(&cpu, &cpu_in)?;
        Ok((got, want))
    };
    match run() {
        Ok((g, w)) if g.len() == labels.len() && w.len() == labels.len() => labels
            .iter()
            .zip(g.iter().zip(&w))
            .map(|(l, (g, w))| compare(&format!("{name} {l}"), g, w, tol))
            .collect(),
        Ok((g, w)) => vec![fail(
            name,
            format!("{} device / {} reference outputs", g.len(), w.len()),
        )],
        Err(e) => vec![fail(name, e)],
    }
}

/// Runs `f` with the backend of precision `p` (or skips) and fails on any failed check.
fn run(p: Precision, what: &str, f: impl Fn(&Cuda, Tolerance) -> Vec<Check>) {
    let Some(be) = device(p) else { return };
    println!("== {what} on {}", be.name());
    let checks = f(&be, tol(p));
    let failed = report(&checks);
    assert_eq!(
        failed, 0,
        "{what}: {failed} checks failed (see the table above)"
    );
}

// ----- the checks, per op ---------------------------------------------------------------------

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

/// (batch, heads, head dim, q grid, k grid, with rel-pos): `Lq = q grid area`, `Lk = k grid area`.
type AttnCase = (usize, usize, usize, (usize, usize), (usize, usize), bool);

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

/// Random attention inputs `[q, k, v, d_o, (rh, rw)]` plus the forward output `o` (last), from
/// the CPU reference (both backends get the same `o`).
fn attn_inputs(rng: &mut Rng, case: &AttnCase) -> medsa::Result<Vec<Tensor>> {
    let &(b, h, d, (qh, qw), (kh, kw), rel) = case;
    let (lq, lk) = (qh * qw, kh * kw);
    let mut ins = vec![
        rng.tensor(&[b, lq, h * d], 1.0),
        rng.tensor(&[b, lk, h * d], 1.0),
        rng.tensor(&[b, lk, h * d], 1.0),
        rng.tensor(&[b, lq, h * d], 1.0),
    ];
    if rel {
        ins.push(rng.tensor(&[qh, kh, d], 0.2));
        ins.push(rng.tensor(&[qw, kw, d], 0.2));
    }
    let o = attn_forward(&Cpu::new(), &ins, case)?;
    ins.push(o);
    Ok(ins)
}

fn attn_scale(d: usize) -> f32 {
    (d as f32).powf(-0.5)
}

fn attn_forward<B: Backend>(be: &B, x: &[B::Tensor], case: &AttnCase) -> medsa::Result<B::Tensor> {
    let &(_, h, d, qg, kg, rel) = case;
    let rel = rel.then(|| RelPos {
        rh: &x[4],
        rw: &x[5],
        q_grid: qg,
        k_grid: kg,
    });
    be.attention(&x[0], &x[1], &x[2], h, attn_scale(d), rel)
}

/// `[dq, dk, dv, (drh, drw)]` with inputs laid out as `attn_inputs`.
fn attn_backward<B: Backend>(
    be: &B,
    x: &[B::Tensor],
    case: &AttnCase,
) -> medsa::Result<Vec<B::Tensor>> {
    let &(_, h, d, qg, kg, rel) = case;
    let o = &x[x.len() - 1];
    let rel = rel.then(|| RelPos {
        rh: &x[4],
        rw: &x[5],
        q_grid: qg,
        k_grid: kg,
    });
    let g = be.attention_backward(&x[0], &x[1], &x[2], o, &x[3], h, attn_scale(d), rel)?;
    let mut v = vec![g.dq, g.dk, g.dv];
    if let Some((drh, drw)) = g.drel {
        v.push(drh);
        v.push(drw);
    }
    Ok(v)
}

fn attn_name(case: &AttnCase) -> String {
    let &(b, h, d, qg, kg, rel) = case;
    format!(
        "attention_backward b{b} h{h} d{d} q{}x{} k{}x{} rel {rel}",
        qg.0, qg.1, kg.0, kg.1
    )
}

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
        fn $f32() {
            run(Precision::F32, stringify!($checks), $checks);
        }
        #[test]
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

// ----- checks without the CPU backward ------------------------------------------------------

/// `sum(a * b)` in f64.
fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum()
}

fn axpy(x: &Tensor, a: f32, u: &Tensor) -> Tensor {
    let v = x
        .data()
        .iter()
        .zip(u.data())
        .map(|(x, u)| x + a * u)
        .collect();
    Tensor::from_vec(v, x.shape()).unwrap()
}

/// Directional derivatives: for every input `i` with a device gradient `grads[i]`, a random
/// direction `u` gives `<grads[i], u>` against the central difference of
/// `L(x) = <dy, forward(x)>` (CPU forward, f32, `eps` step), within 1% of the typical size of
/// `<grad, u>` (`|grad| |u| / sqrt(n)`; a wrong gradient misses by about that much).
fn fd_checks(
    name: &str,
    inputs: &[Tensor],
    dy: &Tensor,
    grads: &[(usize, &str, Tensor)],
    forward: &dyn Fn(&[Tensor]) -> medsa::Result<Tensor>,
    rng: &mut Rng,
) -> Vec<Check> {
    let eps = 1e-2f32;
    let mut out = Vec::new();
    for (i, label, g) in grads {
        let cname = format!("{name} d{label} (finite differences)");
        let u = rng.tensor(inputs[*i].shape(), 1.0);
        let at = |a: f32| -> medsa::Result<f64> {
            let mut x = inputs.to_vec();
            x[*i] = axpy(&inputs[*i], a, &u);
            Ok(dot(dy, &forward(&x)?))
        };
        let (lp, lm) = match (at(eps), at(-eps)) {
            (Ok(p), Ok(m)) => (p, m),
            (Err(e), _) | (_, Err(e)) => {
                out.push(fail(&cname, e));
                continue;
            }
        };
        let fd = (lp - lm) / (2.0 * eps as f64);
        let an = dot(g, &u);
        let typical = (dot(g, g) * dot(&u, &u) / g.numel().max(1) as f64).sqrt();
        let err = (fd - an).abs();
        let ok = err <= 1e-2 * typical + 1e-3 * an.abs();
        out.push(Check {
            name: cname,
            ok,
            max_err_rel_rms: (err / typical.max(1e-30)) as f32,
            detail: if ok {
                String::new()
            } else {
                format!("<grad, u> = {an:.6e}, finite difference {fd:.6e}")
            },
        });
    }
    out
}

#[test]
fn attention_backward_matches_finite_differences() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let mut rng = Rng::new(21);
    let mut checks = Vec::new();
    for case in [
        (2, 2, 64, (8, 8), (8, 8), true),
        (1, 2, 80, (14, 14), (14, 14), true),
        (1, 2, 24, (4, 5), (6, 7), true),
        (2, 3, 16, (37, 1), (53, 1), false),
    ] {
        let name = attn_name(&case);
        let res = (|| -> medsa::Result<Vec<Check>> {
            let ins = attn_inputs(&mut rng, &case)?;
            let dev: Vec<_> = ins
                .iter()
                .map(|t| be.upload(t))
                .collect::<medsa::Result<_>>()?;
            let g = attn_backward(&be, &dev, &case)?;
            let labels = ["q", "k", "v", "rh", "rw"];
            let idx = [0usize, 1, 2, 4, 5];
            let grads: Vec<(usize, &str, Tensor)> = g
                .iter()
                .enumerate()
                .map(|(n, t)| Ok((idx[n], labels[n], be.download(t)?)))
                .collect::<medsa::Result<_>>()?;
            let cpu = Cpu::new();
            let fwd = |x: &[Tensor]| attn_forward(&cpu, x, &case);
            let d_o = ins[3].clone();
            Ok(fd_checks(&name, &ins, &d_o, &grads, &fwd, &mut rng))
        })();
        match res {
            Ok(c) => checks.extend(c),
            Err(e) => checks.push(fail(&name, e)),
        }
    }
    let failed = report(&checks);
    assert_eq!(failed, 0, "{failed} finite-difference checks failed");
}

#[test]
fn layer_norm_and_conv_backward_match_finite_differences() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let mut rng = Rng::new(22);
    let cpu = Cpu::new();
    let mut checks = Vec::new();
    let res = (|| -> medsa::Result<()> {
        // LayerNorm: inputs [x, g, b]; gradients dx, dg, db.
        let (rows, c) = (40, 33);
        let ins = vec![
            rng.tensor(&[rows, c], 3.0),
            rng.tensor(&[c], 1.0),
            rng.tensor(&[c], 1.0),
        ];
        let dy = rng.tensor(&[rows, c], 1.0);
        let (dx, dg, db) = be.layer_norm_backward(
            &be.upload(&ins[0])?,
            &be.upload(&ins[1])?,
            &be.upload(&dy)?,
            1e-5,
        )?;
        let grads = vec![
            (0, "x", be.download(&dx)?),
            (1, "g", be.download(&dg)?),
            (2, "b", be.download(&db)?),
        ];
        let fwd = |x: &[Tensor]| cpu.layer_norm(&x[0], &x[1], &x[2], 1e-5);
        checks.extend(fd_checks(
            "layer_norm_backward 40x33",
            &ins,
            &dy,
            &grads,
            &fwd,
            &mut rng,
        ));
        // conv2d 3x3 pad 1 stride 2: inputs [x, w, b].
        let ins = vec![
            rng.tensor(&[2, 9, 11, 5], 1.0),
            rng.tensor(&[7, 5, 3, 3], 0.3),
            rng.tensor(&[7], 0.3),
        ];
        let dy = rng.tensor(&[2, 5, 6, 7], 1.0);
        let (dx, dw, db) = be.conv2d_backward(
            &be.upload(&ins[0])?,
            &be.upload(&ins[1])?,
            &be.upload(&dy)?,
            2,
            1,
            true,
            true,
        )?;
        let mut grads = Vec::new();
        if let Some(dx) = dx {
            grads.push((0, "x", be.download(&dx)?));
        }
        grads.push((1, "w", be.download(&dw)?));
        if let Some(db) = db {
            grads.push((2, "b", be.download(&db)?));
        }
        let fwd = |x: &[Tensor]| cpu.conv2d(&x[0], &x[1], Some(&x[2]), 2, 1);
        checks.extend(fd_checks(
            "conv2d_backward 3x3 s2 p1",
            &ins,
            &dy,
            &grads,
            &fwd,
            &mut rng,
        ));
        Ok(())
    })();
    if let Err(e) = res {
        checks.push(fail("layer_norm / conv2d finite differences", e));
    }
    let failed = report(&checks);
    assert_eq!(failed, 0, "{failed} finite-difference checks failed");
}

/// Every reduction has a fixed order: two runs give identical bits.
#[test]
fn backward_is_deterministic() {
    for p in [Precision::F32, Precision::Bf16] {
        let Some(be) = device(p) else { return };
        let mut rng = Rng::new(23);
        let case = (2, 2, 64, (14, 14), (14, 14), true);
        let ins = attn_inputs(&mut rng, &case).unwrap();
        let dev: Vec<_> = ins.iter().map(|t| be.upload(t).unwrap()).collect();
        let once = || -> Vec<Tensor> {
            let mut v: Vec<Tensor> = attn_backward(&be, &dev, &case)
                .unwrap()
                .iter()
                .map(|t| be.download(t).unwrap())
                .collect();
            let (x, g, dy) = (
                be.upload(&rng_tensor(31, &[5000, 256], 3.0)).unwrap(),
                be.upload(&rng_tensor(32, &[256], 1.0)).unwrap(),
                be.upload(&rng_tensor(33, &[5000, 256], 1.0)).unwrap(),
            );
            let (dx, dg, db) = be.layer_norm_backward(&x, &g, &dy, 1e-6).unwrap();
            for t in [dx, dg, db, be.sum_rows(&dy, 256).unwrap()] {
                v.push(be.download(&t).unwrap());
            }
            v
        };
        let (a, b) = (once(), once());
        for (n, (x, y)) in a.iter().zip(&b).enumerate() {
            let same = x
                .data()
                .iter()
                .zip(y.data())
                .all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{p:?}: output {n} differs between two identical runs");
        }
    }
}

fn rng_tensor(seed: u64, shape: &[usize], a: f32) -> Tensor {
    Rng::new(seed).tensor(shape, a)
}

#[test]
fn bad_shapes_are_errors() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let t = |s: &[usize]| be.upload(&Tensor::zeros(s)).unwrap();
    assert!(be.activate_backward(&t(&[3]), &t(&[4]), Act::Gelu).is_err());
    assert!(be.sum_rows(&t(&[3, 4]), 5).is_err());
    assert!(be.linear_backward_input(&t(&[3, 4]), &t(&[5, 6])).is_err());
    assert!(be
        .linear_backward_weight(&t(&[3, 4]), &t(&[2, 6]), true)
        .is_err());
    assert!(be
        .layer_norm_backward(&t(&[3, 4]), &t(&[5]), &t(&[3, 4]), 1e-6)
        .is_err());
    let q = t(&[1, 4, 8]);
    let k = t(&[1, 5, 8]);
    assert!(be
        .attention_backward(&q, &k, &k, &k, &q, 2, 1.0, None)
        .is_err());
    let q = t(&[1, 4, 2 * 130]);
    assert!(be
        .attention_backward(&q, &q, &q, &q, &q, 2, 1.0, None)
        .is_err());
    assert!(be
        .conv2d_backward(
            &t(&[1, 8, 8, 3]),
            &t(&[4, 3, 3, 3]),
            &t(&[1, 7, 7, 4]),
            1,
            1,
            true,
            true
        )
        .is_err());
}
