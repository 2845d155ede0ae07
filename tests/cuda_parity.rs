//! The CUDA backend against the CPU reference: every op on fresh random inputs, then the whole
//! model on the golden fixtures, in f32 and bf16 storage. Without a CUDA driver or device they
//! run on the CPU kernel emulator (`tests/common/kemu.rs`, as in CI) or, without a C++
//! compiler, print why and return; `scripts/gpu-check.sh` runs them on a GPU.
#![cfg(feature = "cuda")]

mod common;

use medsa::backend::cuda::{AttentionOptions, Cuda, CudaTensor, EmuSchedule, Precision};
use medsa::backend::{Backend, RelPos, Tokens};
use medsa::medsa::depth_branch::depth_grid;
use medsa::sam::random::Rng;
use medsa::selftest::{self, Tolerance};
use medsa::tensor::Tensor;

fn device(p: Precision) -> Option<Cuda> {
    common::cuda_device("cuda_parity", p)
}

fn check(p: Precision, op_tol: Tolerance, model_tol: Tolerance) {
    let Some(mut be) = device(p) else { return };
    let mut checks = selftest::ops(&be, op_tol);
    // The whole model on both encoder paths: op by op, and fused (with the opt-in kernels).
    for fuse in [false, true] {
        common::set_fused_all(&mut be, fuse);
        checks.extend(tagged_model(
            &be,
            model_tol,
            if fuse { "fused" } else { "op by op" },
        ));
    }
    let failed = selftest::report(&checks);
    println!("peak device memory {} MiB", be.pool().peak() >> 20);
    assert_eq!(
        failed, 0,
        "{failed} CUDA parity checks failed (see the table above)"
    );
}

/// The whole model on the fixtures against the CPU reference, each check's name tagged with
/// the configuration it ran in.
fn tagged_model(be: &Cuda, tol: Tolerance, tag: &str) -> Vec<selftest::Check> {
    let mut m = selftest::model(be, &common::fixtures_dir(), tol);
    for c in &mut m {
        c.name = format!("{} [{tag}]", c.name);
    }
    m
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_f32_matches_cpu_reference() {
    check(Precision::F32, Tolerance::F32, Tolerance::F32);
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_bf16_matches_cpu_reference() {
    check(Precision::Bf16, Tolerance::BF16, Tolerance::BF16_MODEL);
}

#[test]
fn missing_device_is_an_error_not_a_panic() {
    // Ordinal 999 never exists: either no driver or no such device, both reported as errors.
    match Cuda::new(999, Precision::F32) {
        Ok(_) => panic!("cuda:999 opened"),
        Err(e) => assert!(e.to_string().contains("cuda:999"), "{e}"),
    }
}

/// An attention kernel option that must not change a single output bit.
#[derive(Clone, Copy)]
enum Variant {
    /// The 128-query kernel (`--attention-options q128`) against the 64-query one: it changes which warp
    /// computes a row, not a single operation of that row's arithmetic.
    Q128,
    /// Trimming the work past the sequence ends (`--attention-options trim`): skipped rows are never
    /// stored, skipped keys carry exact zeros.
    Trim,
    /// Fetching each K and V tile a whole tile ahead (`--attention-options prefetch`): the same
    /// arithmetic on the same data, from other buffers.
    Prefetch,
}

impl Variant {
    fn set(self, be: &mut Cuda, on: bool) {
        match self {
            Variant::Q128 => be.set_attention_options(AttentionOptions {
                q128: on,
                ..be.attention_options()
            }),
            Variant::Trim => be.set_attention_options(AttentionOptions {
                trim: on,
                ..be.attention_options()
            }),
            Variant::Prefetch => be.set_attention_options(AttentionOptions {
                prefetch: on,
                ..be.attention_options()
            }),
        }
    }

    fn label(self, on: bool) -> &'static str {
        match (self, on) {
            (Variant::Q128, false) => "64-query",
            (Variant::Q128, true) => "128-query",
            (Variant::Trim, false) => "untrimmed",
            (Variant::Trim, true) => "trimmed",
            (Variant::Prefetch, false) => "no prefetch",
            (Variant::Prefetch, true) => "K/V prefetch",
        }
    }
}

/// Runs `f` with `variant` off and on (restoring off) and requires bit-identical, finite
/// outputs (the inputs are finite: a NaN is data read before it was written, which on the
/// emulator would otherwise pass as identical on both sides).
fn same_on_both_kernels(
    be: &mut Cuda,
    variant: Variant,
    name: &str,
    f: impl Fn(&Cuda) -> medsa::Result<<Cuda as Backend>::Tensor>,
) -> Option<String> {
    let mut outs: Vec<Tensor> = Vec::new();
    for on in [false, true] {
        variant.set(be, on);
        let y = f(be).and_then(|y| be.download(&y));
        match y {
            Ok(y) => outs.push(y),
            Err(e) => return Some(format!("{name} ({}): {e}", variant.label(on))),
        }
    }
    variant.set(be, false);
    for (y, on) in outs.iter().zip([false, true]) {
        if let Some(i) = y.data().iter().position(|x| !x.is_finite()) {
            let (label, value) = (variant.label(on), y.data()[i]);
            return Some(format!("{name} ({label}): output {i} is {value}"));
        }
    }
    let (a, b) = (outs[0].data(), outs[1].data());
    let diff = a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits());
    match diff {
        None if a.len() == b.len() => {
            println!(
                "ok    {name}: {} values bit-identical {} / {}",
                a.len(),
                variant.label(false),
                variant.label(true)
            );
            None
        }
        None => Some(format!("{name}: lengths {} vs {}", a.len(), b.len())),
        Some(i) => Some(format!(
            "{name}: first difference at {i}: {} ({}) vs {} ({})",
            a[i],
            variant.label(false),
            b[i],
            variant.label(true)
        )),
    }
}

/// The fused-op self-tests and the whole model on the fixtures against the CPU reference, with
/// fusion on (with the tanh-GELU epilogue and the warp-per-row LayerNorm kernels) and whatever attention
/// options `be` has; prints the table and returns the number of failed checks.
fn fused_ops_and_model(be: &mut Cuda) -> usize {
    common::set_fused_all(be, true);
    let mut checks = selftest::fused_ops(be, Tolerance::BF16);
    checks.extend(selftest::model(
        be,
        &common::fixtures_dir(),
        Tolerance::BF16_MODEL,
    ));
    selftest::report(&checks)
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_attention_q128_is_bit_identical_to_the_64_query_kernel() {
    let Some(mut be) = device(Precision::Bf16) else {
        return;
    };
    let mut rng = Rng::new(128);
    let d = 64;
    let mut failures = Vec::new();
    // (batch, Lq, Lk, heads, rel grids): partial last query tiles (Lq = 196, 37, 200), Lq < 128,
    // Lq != Lk, and the global 64 x 64 grid (whole-tile rel-pos path).
    type Case = (
        usize,
        usize,
        usize,
        usize,
        Option<((usize, usize), (usize, usize))>,
    );
    let cases: &[Case] = &[
        (3, 196, 196, 2, Some(((14, 14), (14, 14)))),
        (2, 37, 53, 3, None),
        (2, 200, 7, 2, None),
        (1, 4096, 4096, 2, Some(((64, 64), (64, 64)))),
        (2, 35, 35, 2, Some(((5, 7), (5, 7)))),
    ];
    for &(bsz, lq, lk, h, grid) in cases {
        let host = [
            rng.tensor(&[bsz, lq, h * d], 1.0),
            rng.tensor(&[bsz, lk, h * d], 1.0),
            rng.tensor(&[bsz, lk, h * d], 1.0),
        ];
        let tables = grid.map(|((qh, qw), (kh, kw))| {
            (rng.tensor(&[qh, kh, d], 0.2), rng.tensor(&[qw, kw, d], 0.2))
        });
        let x: Vec<_> = host.iter().map(|t| be.upload(t).unwrap()).collect();
        let rel_dev = tables
            .as_ref()
            .map(|(a, b)| (be.upload(a).unwrap(), be.upload(b).unwrap()));
        let name = format!("attention b{bsz} {lq}x{lk} h{h} rel {}", grid.is_some());
        let scale = (d as f32).powf(-0.5);
        failures.extend(same_on_both_kernels(&mut be, Variant::Q128, &name, |b| {
            let rel = match (&rel_dev, grid) {
                (Some((rh, rw)), Some((qg, kg))) => Some(RelPos {
                    rh,
                    rw,
                    q_grid: qg,
                    k_grid: kg,
                    shift_invariant: false,
                }),
                _ => None,
            };
            b.attention(&x[0], &x[1], &x[2], h, scale, rel)
        }));
    }
    // Windows of a 20 x 23 map (padded on both axes, pad rows read from `pad`) and the depth
    // map (SD-Trans, 5 slices): the token-row maps of the fused path.
    let h = 2;
    let scale = (d as f32).powf(-0.5);
    let qkv = be
        .upload(&rng.tensor(&[2, 20, 23, 3 * h * d], 1.0))
        .unwrap();
    let pad = be.upload(&rng.tensor(&[3 * h * d], 1.0)).unwrap();
    let (rh, rw) = (
        be.upload(&rng.tensor(&[7, 7, d], 0.2)).unwrap(),
        be.upload(&rng.tensor(&[7, 7, d], 0.2)).unwrap(),
    );
    failures.extend(same_on_both_kernels(
        &mut be,
        Variant::Q128,
        "attention_qkv_windowed 2x20x23 ws 7",
        |b| {
            let rel = RelPos::within(&rh, &rw, (7, 7));
            b.attention_qkv(
                &qkv,
                Tokens::Windows { ws: 7, pad: &pad },
                h,
                scale,
                Some(rel),
            )
        },
    ));
    let depth = 6;
    let (gh, gw) = depth_grid(depth);
    let vol = be
        .upload(&rng.tensor(&[2 * depth, 6, 7, 3 * h * d], 1.0))
        .unwrap();
    let (dh, dw) = (
        be.upload(&rng.tensor(&[gh, gh, d], 0.2)).unwrap(),
        be.upload(&rng.tensor(&[gw, gw, d], 0.2)).unwrap(),
    );
    failures.extend(same_on_both_kernels(
        &mut be,
        Variant::Q128,
        "attention_qkv_depth 2 volumes x 6 slices of 6x7",
        |b| {
            let rel = RelPos::within(&dh, &dw, (gh, gw));
            b.attention_qkv(&vol, Tokens::Depth { depth }, h, scale, Some(rel))
        },
    ));
    // And against the CPU reference: the variant through the fused-op self-tests (windowed
    // and depth attention on random inputs, bf16 tolerance; the plain attention shapes are
    // covered by the bit-identity checks above, and the whole op set already ran in
    // cuda_bf16_matches_cpu_reference) and the whole model on the fixtures, fused path.
    // Fusion on also selects the warp-per-row LayerNorm kernels, which these cases cover.
    be.set_attention_options(AttentionOptions {
        q128: true,
        ..AttentionOptions::default()
    });
    let failed = fused_ops_and_model(&mut be);
    assert!(
        failures.is_empty() && failed == 0,
        "128-query attention: {failures:#?}, {failed} CPU parity checks failed"
    );
}

/// The 128-query kernel bit-identical to the 64-query one, with the options `be` has, on packed
/// self-attention (head dim 64) for each `(batch, grid, heads, shift-invariant tables)`.
fn q128_same_on_grids(
    be: &mut Cuda,
    rng: &mut Rng,
    cases: &[(usize, (usize, usize), usize, bool)],
    tag: &str,
) -> Vec<String> {
    let d = 64;
    let scale = (d as f32).powf(-0.5);
    let mut failures = Vec::new();
    for &(bsz, (gh, gw), h, si) in cases {
        let mut r = |s: &[usize], a: f32| rng.tensor(s, a);
        let qkv = be.upload(&r(&[bsz, gh * gw, 3 * h * d], 1.0)).unwrap();
        let rh = be.upload(&selftest::rel_table(&mut r, gh, d, si)).unwrap();
        let rw = be.upload(&selftest::rel_table(&mut r, gw, d, si)).unwrap();
        let name = format!(
            "attention_qkv b{bsz} {gh}x{gw} h{h}{} {tag}",
            if si { " shift-invariant" } else { "" }
        );
        failures.extend(same_on_both_kernels(be, Variant::Q128, &name, |b| {
            let rel = if si {
                RelPos::shift_invariant(&rh, &rw, (gh, gw))
            } else {
                RelPos::within(&rh, &rw, (gh, gw))
            };
            b.attention_qkv(&qkv, Tokens::Sequences, h, scale, Some(rel))
        }));
    }
    failures
}

/// The rel-pos terms on tensor cores (`--attention-options rel-mma`, shift-invariant tables only):
/// every op self-test against the CPU reference (their shift-invariant attention cases take
/// it: plain, windowed with padding and depth maps, head dims 64 and 80, the whole-tile 64-wide
/// grids and grids spanning several rows per warp), the 128-query variant bit-identical to the
/// 64-query kernel with it, and the whole model on both encoder paths.
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_attention_rel_mma_matches_cpu_reference() {
    let Some(mut be) = device(Precision::Bf16) else {
        return;
    };
    let rel_mma = AttentionOptions {
        rel_mma: true,
        ..AttentionOptions::default()
    };
    be.set_attention_options(rel_mma);
    let mut checks = selftest::ops(&be, Tolerance::BF16);
    // The q128 variant computes each warp's rel-pos terms for the same 16 query rows as the
    // 64-query kernel does, so the outputs stay bit-identical.
    let failures = q128_same_on_grids(
        &mut be,
        &mut Rng::new(2 * 64 - 1),
        &[
            (1, (64, 64), 2, true),
            (3, (14, 14), 2, true),
            (2, (5, 7), 3, true),
        ],
        "rel mma",
    );
    for (fuse, q128) in [(false, false), (true, false), (true, true)] {
        common::set_fused_all(&mut be, fuse);
        be.set_attention_options(AttentionOptions { q128, ..rel_mma });
        let tag = format!("rel mma, fused {fuse}, q128 {q128}");
        checks.extend(tagged_model(&be, Tolerance::BF16_MODEL, &tag));
    }
    let failed = selftest::report(&checks);
    assert!(
        failures.is_empty() && failed == 0,
        "rel-pos terms on tensor cores: {failures:#?}, {failed} CPU parity checks failed"
    );
}

/// Inputs of the attention cases whose outputs an option promises to leave bit for bit: plain
/// sequences with partial query and key tiles (37 queries on 53 keys, 200 on 7, 70 on 150: three
/// key tiles, the last partial), 196-token windows with padding, the whole-tile rel-pos path of
/// an 8 x 64 grid (eight key tiles, none partial), and a 6-slice depth map; head dim `d`.
struct BitCases {
    d: usize,
    plain: Vec<(CudaTensor, CudaTensor, CudaTensor)>,
    windows: (CudaTensor, CudaTensor),
    grid64: CudaTensor,
    vol: CudaTensor,
    tables: Vec<CudaTensor>,
}

const HEADS: usize = 2;
const DEPTH: usize = 6;

impl BitCases {
    fn new(be: &Cuda, rng: &mut Rng, d: usize) -> Self {
        let h = HEADS;
        let mut up = |s: &[usize]| be.upload(&rng.tensor(s, 1.0)).unwrap();
        let plain = [(37, 53), (200, 7), (70, 150)]
            .iter()
            .map(|&(lq, lk)| {
                (
                    up(&[2, lq, h * d]),
                    up(&[2, lk, h * d]),
                    up(&[2, lk, h * d]),
                )
            })
            .collect();
        let windows = (up(&[1, 2 * 14 + 3, 14 + 5, 3 * h * d]), up(&[3 * h * d]));
        let grid64 = up(&[2, 8 * 64, 3 * h * d]);
        let vol = up(&[2 * DEPTH, 3, 5, 3 * h * d]);
        let (gh, gw) = depth_grid(DEPTH);
        let mut r = |s: &[usize], a: f32| rng.tensor(s, a);
        let tables = [14, 14, 8, 64, gh, gw]
            .iter()
            .map(|&g| be.upload(&selftest::rel_table(&mut r, g, d, true)).unwrap())
            .collect();
        BitCases {
            d,
            plain,
            windows,
            grid64,
            vol,
            tables,
        }
    }

    /// Every case with `variant` off and on, under `be`'s other options; the failures.
    fn check(&self, be: &mut Cuda, variant: Variant, tag: &str) -> Vec<String> {
        let (h, t) = (HEADS, &self.tables);
        let scale = (self.d as f32).powf(-0.5);
        let mut failures = Vec::new();
        for (q, k, v) in &self.plain {
            let name = format!(
                "attention {}x{} d{} {tag}",
                q.shape()[1],
                k.shape()[1],
                self.d
            );
            failures.extend(same_on_both_kernels(be, variant, &name, |b| {
                b.attention(q, k, v, h, scale, None)
            }));
        }
        let (qkv, pad) = &self.windows;
        let name = format!("attention_qkv_windowed 31x19 ws 14 d{} {tag}", self.d);
        failures.extend(same_on_both_kernels(be, variant, &name, |b| {
            let rel = RelPos::shift_invariant(&t[0], &t[1], (14, 14));
            b.attention_qkv(qkv, Tokens::Windows { ws: 14, pad }, h, scale, Some(rel))
        }));
        let name = format!("attention_qkv 8x64 d{} {tag}", self.d);
        failures.extend(same_on_both_kernels(be, variant, &name, |b| {
            let rel = RelPos::shift_invariant(&t[2], &t[3], (8, 64));
            b.attention_qkv(&self.grid64, Tokens::Sequences, h, scale, Some(rel))
        }));
        let name = format!("attention_qkv_depth 2 x 6 slices of 3x5 d{} {tag}", self.d);
        let grid = depth_grid(DEPTH);
        failures.extend(same_on_both_kernels(be, variant, &name, |b| {
            let rel = RelPos::shift_invariant(&t[4], &t[5], grid);
            b.attention_qkv(
                &self.vol,
                Tokens::Depth { depth: DEPTH },
                h,
                scale,
                Some(rel),
            )
        }));
        failures
    }
}

/// Trimming the work past the sequence ends (`--attention-options trim`) leaves every output bit as it
/// was ([`BitCases`]: partial query and key tiles, the unmasked whole-tile rel-pos path, head
/// dims 64 and 80), on both kernels and both rel-pos prologues, with and without exp2. Then all
/// the opt-in attention paths together, with fusion, against the CPU reference: the fused-op
/// self-tests and the whole model.
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_attention_trim_is_bit_identical_and_all_options_match_cpu() {
    let Some(mut be) = device(Precision::Bf16) else {
        return;
    };
    let mut rng = Rng::new(208);
    let mut failures = Vec::new();
    for d in [64, 80] {
        let cases = BitCases::new(&be, &mut rng, d);
        for (q128, rel_mma, exp2) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (false, false, true),
            (true, true, true),
        ] {
            be.set_attention_options(AttentionOptions {
                q128,
                rel_mma,
                exp2,
                ..AttentionOptions::default()
            });
            let tag = format!("q128 {q128} rel-mma {rel_mma} exp2 {exp2}");
            failures.extend(cases.check(&mut be, Variant::Trim, &tag));
        }
    }
    be.set_attention_options(AttentionOptions {
        q128: true,
        rel_mma: true,
        trim: true,
        exp2: true,
        prefetch: true,
    });
    let failed = fused_ops_and_model(&mut be);
    assert!(
        failures.is_empty() && failed == 0,
        "trimmed attention: {failures:#?}, {failed} CPU parity checks failed with every option on"
    );
}

/// The softmax in log2 units (`--attention-options exp2`, the `attention_exp2` and `attention_q128_exp2`
/// kernels): every op self-test against the CPU reference (plain, windowed and depth attention,
/// arbitrary and shift-invariant tables, head dims 64 and 80, the whole-tile path whose height
/// term it folds into the row offsets), the 128-query kernel bit-identical to the 64-query one
/// with it, and the whole model on both encoder paths.
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_attention_exp2_matches_cpu_reference() {
    let Some(mut be) = device(Precision::Bf16) else {
        return;
    };
    let exp2 = AttentionOptions {
        exp2: true,
        ..AttentionOptions::default()
    };
    be.set_attention_options(exp2);
    let mut checks = selftest::ops(&be, Tolerance::BF16);
    let failures = q128_same_on_grids(
        &mut be,
        &mut Rng::new(1443),
        &[(1, (8, 64), 2, false), (3, (14, 14), 2, true)],
        "exp2",
    );
    for fuse in [false, true] {
        common::set_fused_all(&mut be, fuse);
        checks.extend(tagged_model(
            &be,
            Tolerance::BF16_MODEL,
            &format!("exp2, fused {fuse}"),
        ));
    }
    let failed = selftest::report(&checks);
    assert!(
        failures.is_empty() && failed == 0,
        "exp2 softmax: {failures:#?}, {failed} CPU parity checks failed"
    );
}

/// Fetching each K and V tile a whole tile ahead (`--attention-options prefetch`, two K and two V
/// buffers, one barrier per key tile) leaves every output bit as it was ([`BitCases`]: one to
/// eight key tiles, so the buffers alternate and the last tile issues no fetch; windows with
/// padding, depth maps, head dims 64 and 80), on both kernels, with and without the other
/// options. The second buffers are partly the Q tile's shared memory, so on the emulator the
/// cases run twice: threads in order with copies landing at once (a fetch into it while a
/// thread still reads Q changes the outputs), and threads shuffled with copies landing only at
/// their wait (a wait that misses a tile, or a buffer refilled while a warp still reads it,
/// changes them).
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn cuda_attention_prefetch_is_bit_identical() {
    let Some(mut be) = device(Precision::Bf16) else {
        return;
    };
    let mut rng = Rng::new(4);
    let mut failures = Vec::new();
    for d in [64, 80] {
        let cases = BitCases::new(&be, &mut rng, d);
        for (q128, rel_mma, trim, exp2, schedule) in [
            (false, false, false, false, EmuSchedule::InOrder),
            (false, false, false, false, EmuSchedule::Shuffled(44)),
            (true, false, false, false, EmuSchedule::InOrder),
            (true, false, false, false, EmuSchedule::Shuffled(45)),
            (false, true, true, true, EmuSchedule::Shuffled(46)),
            (true, true, true, true, EmuSchedule::Shuffled(47)),
        ] {
            be.set_emulator_schedule(schedule);
            be.set_attention_options(AttentionOptions {
                q128,
                rel_mma,
                trim,
                exp2,
                prefetch: false,
            });
            let tag = format!("q128 {q128} rel-mma {rel_mma} trim {trim} exp2 {exp2} {schedule:?}");
            failures.extend(cases.check(&mut be, Variant::Prefetch, &tag));
        }
    }
    be.set_emulator_schedule(EmuSchedule::InOrder);
    assert!(failures.is_empty(), "K/V prefetch: {failures:#?}");
}
