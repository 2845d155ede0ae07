//! CPU benchmarks of the hot ops and of the vit_b image encoder at a reduced input size.
//! The full 1024x1024 comparison against PyTorch lives in `tools/bench_cpu.sh` (one vit_b pass
//! takes seconds, too long for criterion's sampling on a 2-core machine).

use criterion::{criterion_group, criterion_main, Criterion};

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, Backend, RelPos, Tokens};
use medsa::sam::random::{random_checkpoint, Rng};
use medsa::sam::{Sam, SamConfig, Trace};
use medsa::weights::WeightStore;

fn ops(c: &mut Criterion) {
    let be = Cpu::new();
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("ops");
    g.sample_size(10);

    // vit_b's qkv projection over a 64x64 token grid.
    let x = rng.tensor(&[4096, 768], 1.0);
    let w = rng.tensor(&[2304, 768], 0.03);
    let b = rng.tensor(&[2304], 0.1);
    g.bench_function("linear 4096x768 -> 2304", |bch| {
        bch.iter(|| be.linear(&x, &w, Some(&b), Act::None).unwrap())
    });

    // One global-attention block of vit_b: 4096 tokens, 12 heads of 64, rel-pos bias.
    let q = rng.tensor(&[1, 4096, 768], 1.0);
    let k = rng.tensor(&[1, 4096, 768], 1.0);
    let v = rng.tensor(&[1, 4096, 768], 1.0);
    let rh = rng.tensor(&[64, 64, 64], 0.05);
    let rw = rng.tensor(&[64, 64, 64], 0.05);
    g.bench_function("attention global 4096 tok 12x64 relpos", |bch| {
        bch.iter(|| {
            let rel = RelPos::within(&rh, &rw, (64, 64));
            be.attention(&q, &k, &v, 12, 0.125, Some(rel)).unwrap()
        })
    });
    let h = rng.tensor(&[4096, 3072], 1.0);
    g.bench_function("gelu 4096x3072", |bch| {
        bch.iter(|| be.activate(&h, Act::Gelu).unwrap())
    });
    g.finish();
}

fn encoder(c: &mut Criterion) {
    let be = Cpu::new();
    let cfg = SamConfig::published("vit_b", true, false).unwrap();
    let mut ws = WeightStore::from_tensors("random vit_b", random_checkpoint(&cfg, 0));
    let model = Sam::from_store(&be, &mut ws).unwrap();
    let x = be
        .upload(&Rng::new(1).tensor(&[1, 3, 256, 256], 2.0))
        .unwrap();
    let mut g = c.benchmark_group("encoder");
    g.sample_size(10);
    g.bench_function("vit_b + Med-SA adapters, 256x256", |bch| {
        bch.iter(|| model.encode(&be, &x, None, &mut Trace::off()).unwrap())
    });
    g.finish();
}

/// The same hot ops on the GPU (bf16), synchronised per iteration; skipped without a device.
#[cfg(feature = "cuda")]
fn cuda_ops(c: &mut Criterion) {
    use medsa::backend::cuda::{driver_present, AttentionOptions, Cuda, Precision};
    if !driver_present() {
        eprintln!("cuda benches skipped: no NVIDIA driver on this machine");
        return;
    }
    let mut be = match Cuda::new(0, Precision::Bf16) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda benches skipped: {e}");
            return;
        }
    };
    // The "fused" rows below time the opt-in kernels too: the GELU epilogue and, in the first
    // group's layer_norm, the warp-per-row kernel.
    be.set_run_options(&medsa::backend::RunOptions {
        gelu_tanh_epilogue: true,
        layernorm_rows: true,
        ..Default::default()
    });
    let be = be;
    let mut rng = Rng::new(3);
    let mut up = |s: &[usize], a: f32| be.upload(&rng.tensor(s, a)).unwrap();
    let x = up(&[8 * 4096, 768], 1.0);
    let w = up(&[2304, 768], 0.03);
    let b = up(&[2304], 0.1);
    let qkv = up(&[8, 4096, 2304], 1.0);
    let rh = up(&[64, 64, 64], 0.05);
    let rw = up(&[64, 64, 64], 0.05);
    let g = up(&[768], 1.0);
    let mut grp = c.benchmark_group("cuda bf16");
    grp.sample_size(20);
    grp.bench_function("linear 32768x768 -> 2304", |bch| {
        bch.iter(|| {
            be.linear(&x, &w, Some(&b), Act::None).unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.bench_function("attention_qkv global b8 4096 tok 12x64 relpos", |bch| {
        bch.iter(|| {
            let rel = RelPos::within(&rh, &rw, (64, 64));
            be.attention_qkv(&qkv, Tokens::Sequences, 12, 0.125, Some(rel))
                .unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.bench_function("layer_norm 32768x768", |bch| {
        bch.iter(|| {
            be.layer_norm(&x, &g, &g, 1e-6).unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.finish();

    // Fused ops against the op sequences they replace (vit_b at 1024, batch 8). Each pair runs
    // in the same process on the same inputs: compare the two lines of a pair, not across runs.
    let mut rng = Rng::new(4);
    let mut up = |s: &[usize], a: f32| be.upload(&rng.tensor(s, a)).unwrap();
    let xmap = up(&[8, 64, 64, 768], 1.0);
    let r = up(&[8 * 4096, 768], 1.0);
    let w1 = up(&[3072, 768], 0.03);
    let b1 = up(&[3072], 0.1);
    let wp = up(&[768, 768], 0.03);
    let bp = up(&[768], 0.1);
    let pad = up(&[2304], 1.0);
    let rh14 = up(&[14, 14, 64], 0.05);
    let rw14 = up(&[14, 14, 64], 0.05);
    let rel14 = || Some(RelPos::within(&rh14, &rw14, (14, 14)));
    let mut grp = c.benchmark_group("cuda bf16 fused vs plain");
    grp.sample_size(20);
    grp.bench_function(
        "windowed attention 64x64 ws14: plain (partition, qkv on 4900 rows, unpartition)",
        |bch| {
            bch.iter(|| {
                let p = be.window_partition(&xmap, 14).unwrap();
                let q = be.linear(&p, &w, Some(&b), Act::None).unwrap();
                let q = be.reshape(&q, &[8 * 25, 196, 2304]).unwrap();
                let o = be
                    .attention_qkv(&q, Tokens::Sequences, 12, 0.125, rel14())
                    .unwrap();
                let o = be.reshape(&o, &[8 * 25, 14, 14, 768]).unwrap();
                be.window_unpartition(&o, 14, (64, 64)).unwrap();
                be.synchronize().unwrap()
            })
        },
    );
    grp.bench_function(
        "windowed attention 64x64 ws14: fused (qkv on 4096 rows, windows in the kernel)",
        |bch| {
            bch.iter(|| {
                let q = be.linear(&xmap, &w, Some(&b), Act::None).unwrap();
                be.attention_qkv(
                    &q,
                    Tokens::Windows { ws: 14, pad: &pad },
                    12,
                    0.125,
                    rel14(),
                )
                .unwrap();
                be.synchronize().unwrap()
            })
        },
    );
    grp.bench_function(
        "mlp lin1 32768x768 -> 3072 + GELU: plain (GEMM + bias, GELU kernel)",
        |bch| {
            bch.iter(|| {
                let y = be.linear(&x, &w1, Some(&b1), Act::None).unwrap();
                be.activate(&y, Act::Gelu).unwrap();
                be.synchronize().unwrap()
            })
        },
    );
    grp.bench_function(
        "mlp lin1 32768x768 -> 3072 + GELU: fused (GELU epilogue)",
        |bch| {
            bch.iter(|| {
                be.linear(&x, &w1, Some(&b1), Act::Gelu).unwrap();
                be.synchronize().unwrap()
            })
        },
    );
    grp.bench_function(
        "proj 32768x768 + residual: plain (GEMM, add kernel)",
        |bch| {
            bch.iter(|| {
                medsa::backend::fused::linear_residual(&be, &x, &wp, Some(&bp), &r, 1.0).unwrap();
                be.synchronize().unwrap()
            })
        },
    );
    grp.bench_function("proj 32768x768 + residual: fused (C operand)", |bch| {
        bch.iter(|| {
            be.linear_residual(&x, &wp, Some(&bp), &r, 1.0).unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.bench_function("add + layer_norm 32768x768: plain (two kernels)", |bch| {
        bch.iter(|| {
            medsa::backend::fused::add_layer_norm(&be, &x, &r, 1.0, &g, &g, 1e-6).unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.bench_function("add + layer_norm 32768x768: fused (one kernel)", |bch| {
        bch.iter(|| {
            be.add_layer_norm(&x, &r, 1.0, &g, &g, 1e-6).unwrap();
            be.synchronize().unwrap()
        })
    });
    grp.finish();

    // The attention kernel options (RunOptions::attention), each against none, on vit_b's global and
    // windowed attentions at batch 8 with SAM's shift-invariant rel-pos tables: 128 query rows
    // per block instead of 64; the rel-pos terms on tensor cores instead of per-row dot
    // products; no mma work past the sequence ends (the partial tiles of the 196-token
    // windows) and no key masking in the global blocks' whole tiles. Compare with the first
    // pair of lines.
    let mut be = be;
    let qkv_map = be.reshape(&qkv, &[8, 64, 64, 2304]).unwrap();
    let mut rng = Rng::new(5);
    let mut gathered = |side: usize| {
        let t = medsa::sam::rel_pos::gather(&rng.tensor(&[2 * side - 1, 64], 0.05), side, side);
        be.upload(&t.unwrap()).unwrap()
    };
    let (gh64, gw64, gh14, gw14) = (gathered(64), gathered(64), gathered(14), gathered(14));
    let mut grp = c.benchmark_group("cuda bf16 attention kernel options");
    grp.sample_size(20);
    let none = AttentionOptions::default();
    for (how, opts) in [
        ("no option", none),
        ("128 queries", AttentionOptions { q128: true, ..none }),
        (
            "rel-pos mma",
            AttentionOptions {
                rel_mma: true,
                ..none
            },
        ),
        ("trimmed", AttentionOptions { trim: true, ..none }),
        ("exp2 softmax", AttentionOptions { exp2: true, ..none }),
        (
            "K/V prefetch",
            AttentionOptions {
                prefetch: true,
                ..none
            },
        ),
    ] {
        be.set_attention_options(opts);
        grp.bench_function(
            format!("attention_qkv global b8 4096 tok 12x64 relpos: {how}"),
            |bch| {
                bch.iter(|| {
                    let rel = RelPos::shift_invariant(&gh64, &gw64, (64, 64));
                    be.attention_qkv(&qkv, Tokens::Sequences, 12, 0.125, Some(rel))
                        .unwrap();
                    be.synchronize().unwrap()
                })
            },
        );
        grp.bench_function(
            format!("attention_qkv_windowed b8 64x64 ws14 12x64 relpos: {how}"),
            |bch| {
                bch.iter(|| {
                    let rel = RelPos::shift_invariant(&gh14, &gw14, (14, 14));
                    be.attention_qkv(
                        &qkv_map,
                        Tokens::Windows { ws: 14, pad: &pad },
                        12,
                        0.125,
                        Some(rel),
                    )
                    .unwrap();
                    be.synchronize().unwrap()
                })
            },
        );
    }
    grp.finish();
}

#[cfg(not(feature = "cuda"))]
fn cuda_ops(_: &mut Criterion) {}

criterion_group!(benches, ops, encoder, cuda_ops);
criterion_main!(benches);
