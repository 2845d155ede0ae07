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

#[path = "../common/mod.rs"]
mod common;
mod determinism_and_errors;
mod finite_differences;
mod op_parity;

use medsa::backend::cpu::Cpu;
use medsa::backend::cuda::{Cuda, Precision};
use medsa::backend::{Backend, RelPos};
use medsa::sam::random::Rng;
use medsa::selftest::{compare, report, Check, Tolerance};
use medsa::Tensor;

fn device(p: Precision) -> Option<Cuda> {
    common::cuda_device("cuda_backward", p)
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

/// (batch, heads, head dim, q grid, k grid, with rel-pos): `Lq = q grid area`, `Lk = k grid area`.
type AttnCase = (usize, usize, usize, (usize, usize), (usize, usize), bool);

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
        shift_invariant: false,
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
        shift_invariant: false,
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
