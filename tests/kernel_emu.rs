//! Races in the CUDA kernels, found on the CPU kernel emulator (`tools/kemu`): the same ops run
//! with the block's threads in index order and in shuffled orders with asynchronous copies
//! landing as late as allowed (at their wait). A missing `__syncthreads` or cp.async wait makes
//! some thread read shared memory before it is written (NaN bytes there) or after it is
//! overwritten, so the outputs change. (The other CUDA tests also run on the emulator when
//! there is no GPU, in index order: `tests/common/mod.rs`, `cuda_device`.)
//!
//! A last test plants each fault the emulator claims to find in a kernel of
//! `tools/kemu/checks.cu` and requires it to be reported.
//!
//! On a machine with a GPU, or without a C++ compiler, these tests print why and return.
#![cfg(feature = "cuda")]

mod common;

use medsa::backend::cuda::{AttentionOptions, Cuda, CudaTensor, EmuSchedule, Precision};
use medsa::backend::{Backend, RelPos, Tokens};
use medsa::sam::random::Rng;
use medsa::selftest::{self, Tolerance};
use medsa::Tensor;

const ALL_OPTIONS: AttentionOptions = AttentionOptions {
    q128: true,
    rel_mma: true,
    trim: true,
    exp2: true,
    prefetch: true,
};

fn emulator(test: &str, p: Precision) -> Option<Cuda> {
    if medsa::backend::cuda::driver_present() {
        eprintln!("{test}: SKIPPED: a GPU driver is present; the GPU tests cover the kernels");
        return None;
    }
    common::kemu::emulated_device(test, p)
}

/// Every op self-test (forward, fused and backward ops against the CPU reference) with the
/// threads of every block shuffled at every round and cp.async copies deferred to their wait.
fn self_tests_shuffled(p: Precision, tol: Tolerance, seed: u64) {
    let test = format!("self_tests_shuffled {p:?}");
    let Some(mut be) = emulator(&test, p) else {
        return;
    };
    common::set_fused_all(&mut be, true);
    be.set_attention_options(ALL_OPTIONS);
    be.set_emulator_schedule(EmuSchedule::Shuffled(seed));
    let failed = selftest::report(&selftest::ops(&be, tol));
    assert_eq!(
        failed, 0,
        "{failed} op self-tests failed under shuffled schedules"
    );
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn op_self_tests_pass_under_shuffled_schedules_f32() {
    self_tests_shuffled(Precision::F32, Tolerance::F32, 7);
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn op_self_tests_pass_under_shuffled_schedules_bf16() {
    self_tests_shuffled(Precision::Bf16, Tolerance::BF16, 11);
}

type Op = Box<dyn Fn(&Cuda) -> medsa::Result<Vec<CudaTensor>>>;

/// The ops whose kernels stage data in shared memory, on inputs with partial tiles.
fn staged_ops(be: &Cuda, rng: &mut Rng) -> Vec<(String, Op)> {
    let mut up = |s: &[usize], a: f32| be.upload(&rng.tensor(s, a)).unwrap();
    let mut ops: Vec<(String, Op)> = Vec::new();
    for d in [64, 80, 32] {
        let h = 2;
        let scale = (d as f32).powf(-0.5);
        let (q, k, v) = (
            up(&[2, 37, h * d], 1.0),
            up(&[2, 53, h * d], 1.0),
            up(&[2, 53, h * d], 1.0),
        );
        let dout = up(&[2, 37, h * d], 1.0);
        let qkv = up(&[1, 12 * 10, 3 * h * d], 1.0);
        let map = up(&[1, 17, 15, 3 * h * d], 1.0);
        let pad = up(&[3 * h * d], 1.0);
        let vol = up(&[2 * 6, 3, 5, 3 * h * d], 1.0);
        let (rh, rw) = (up(&[12, 12, d], 0.2), up(&[10, 10, d], 0.2));
        let (wh, ww) = (up(&[7, 7, d], 0.2), up(&[7, 7, d], 0.2));
        let (dh, dw) = (up(&[2, 2, d], 0.2), up(&[3, 3, d], 0.2));
        ops.push((
            format!("attention + backward 37x53 d{d}"),
            Box::new(move |b| {
                let o = b.attention(&q, &k, &v, h, scale, None)?;
                let g = b.attention_backward(&q, &k, &v, &o, &dout, h, scale, None)?;
                Ok(vec![o, g.dq, g.dk, g.dv])
            }),
        ));
        ops.push((
            format!("attention_qkv 12x10 rel d{d}"),
            Box::new(move |b| {
                let rel = RelPos::within(&rh, &rw, (12, 10));
                Ok(vec![b.attention_qkv(
                    &qkv,
                    Tokens::Sequences,
                    h,
                    scale,
                    Some(rel),
                )?])
            }),
        ));
        ops.push((
            format!("attention_qkv_windowed 17x15 ws7 d{d}"),
            Box::new(move |b| {
                let rel = RelPos::within(&wh, &ww, (7, 7));
                Ok(vec![b.attention_qkv(
                    &map,
                    Tokens::Windows { ws: 7, pad: &pad },
                    h,
                    scale,
                    Some(rel),
                )?])
            }),
        ));
        ops.push((
            format!("attention_qkv_depth 6 slices d{d}"),
            Box::new(move |b| {
                let rel = RelPos::within(&dh, &dw, (2, 3));
                Ok(vec![b.attention_qkv(
                    &vol,
                    Tokens::Depth { depth: 6 },
                    h,
                    scale,
                    Some(rel),
                )?])
            }),
        ));
    }
    let x = up(&[37, 200], 1.0);
    let r = up(&[37, 200], 1.0);
    let (g, bias) = (up(&[200], 1.0), up(&[200], 1.0));
    ops.push((
        "layer_norm, add_layer_norm 37x200".into(),
        Box::new(move |b| {
            let y = b.layer_norm(&x, &g, &bias, 1e-6)?;
            let (s, z) = b.add_layer_norm(&x, &r, 0.5, &g, &bias, 1e-6)?;
            Ok(vec![y, s, z])
        }),
    ));
    ops
}

fn bits(be: &Cuda, ts: &[CudaTensor]) -> Vec<Tensor> {
    ts.iter().map(|t| be.download(t).unwrap()).collect()
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn staged_kernels_give_the_same_bits_in_every_thread_order() {
    let test = "staged_kernels_give_the_same_bits_in_every_thread_order";
    let Some(mut be) = emulator(test, Precision::Bf16) else {
        return;
    };
    common::set_fused_all(&mut be, true);
    let mut failures = Vec::new();
    for opts in [AttentionOptions::default(), ALL_OPTIONS] {
        be.set_attention_options(opts);
        for (name, op) in staged_ops(&be, &mut Rng::new(5)) {
            be.set_emulator_schedule(EmuSchedule::InOrder);
            let want = bits(&be, &op(&be).unwrap());
            for seed in [1, 2] {
                be.set_emulator_schedule(EmuSchedule::Shuffled(seed));
                let got = match op(&be) {
                    Ok(g) => bits(&be, &g),
                    Err(e) => {
                        failures.push(format!("{name} {opts:?} shuffled {seed}: {e}"));
                        continue;
                    }
                };
                let same = got.iter().zip(&want).all(|(a, b)| {
                    a.data()
                        .iter()
                        .zip(b.data())
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                });
                if !same {
                    failures.push(format!(
                        "{name} {opts:?}: shuffled order {seed} changed the output"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// 16-byte aligned scratch, as device allocations are (cp.async needs it).
#[repr(C, align(16))]
struct Buf([f32; 64]);

/// The faults the emulator claims to find (tools/kemu/kemu.h), each planted in a kernel of
/// tools/kemu/checks.cu, are reported; and its mma.sync, fed through mma.cuh's fragment layout,
/// computes the plain product.
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn the_emulator_reports_planted_faults_and_multiplies_right() {
    let test = "the_emulator_reports_planted_faults_and_multiplies_right";
    let Some(be) = emulator(test, Precision::F32) else {
        return;
    };
    let launch = |name: &str, threads: u32, smem: u32, ptrs: &[u64]| {
        be.emulator_launch(name, threads, smem, ptrs)
            .map_err(|e| e.to_string())
    };
    let mut out = Box::new(Buf([0.0; 64]));
    let o = out.0.as_mut_ptr() as u64;
    launch("kemu_check_unsynced", 64, 256, &[o]).unwrap();
    assert!(
        out.0.iter().any(|x| x.is_nan()),
        "a read before the write it needs must see the NaN fill: {:?}",
        &out.0[..4]
    );
    let expect_err =
        |name: &str, threads: u32, smem: u32, needle: &str| match launch(name, threads, smem, &[o])
        {
            Ok(()) => panic!("{name}: the emulator did not report the fault"),
            Err(e) => assert!(e.contains(needle), "{name}: {e}"),
        };
    expect_err("kemu_check_divergent", 32, 0, "diverged");
    expect_err("kemu_check_lost_lane", 32, 0, "deadlock");
    expect_err("kemu_check_smem_range", 64, 256, "past the launch");
    expect_err("kemu_check_trap", 64, 0, "checks.cu");

    let mut rng = Rng::new(16);
    let a: Vec<u16> = (0..256)
        .map(|_| half::bf16::from_f32(rng.sym(1.0)).to_bits())
        .collect();
    let b: Vec<u16> = (0..128)
        .map(|_| half::bf16::from_f32(rng.sym(1.0)).to_bits())
        .collect();
    let mut d = vec![0f32; 128];
    launch(
        "kemu_check_mma",
        32,
        0,
        &[a.as_ptr() as u64, b.as_ptr() as u64, d.as_mut_ptr() as u64],
    )
    .unwrap();
    let f = |x: u16| half::bf16::from_bits(x).to_f32() as f64;
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = (0..16).map(|k| f(a[i * 16 + k]) * f(b[k * 8 + j])).sum();
            assert!(
                (d[i * 8 + j] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "mma D[{i}][{j}] = {}, expected {want}",
                d[i * 8 + j]
            );
        }
    }
}
