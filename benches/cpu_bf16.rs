//! The CPU's bf16 products against its f32 ones, in the same run: vit_b's linears over a 64x64
//! token grid and one global-attention block, as GFLOP/s (criterion's "elements" are FLOPs).
//! `cargo bench --bench cpu_bf16`; the whole-encoder comparison is `tools/bench_cpu.sh`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, Backend, Precision, RelPos};
use medsa::sam::random::Rng;

fn backends() -> Vec<(&'static str, Cpu)> {
    vec![
        ("f32", Cpu::new()),
        ("bf16", Cpu::new().with_precision(Precision::Bf16)),
    ]
}

fn products(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let mut g = c.benchmark_group("products");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(4));
    for (m, k, n) in [
        (4096, 256, 2304),
        (4096, 768, 2304),
        (4096, 768, 3072),
        (4096, 3072, 768),
    ] {
        let x = rng.tensor(&[m, k], 1.0);
        let w = rng.tensor(&[n, k], 0.03);
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for (name, be) in backends() {
            g.bench_function(format!("linear {m}x{k} -> {n} {name}"), |bch| {
                bch.iter(|| be.linear(&x, &w, None, Act::None).unwrap())
            });
        }
    }
    let q = rng.tensor(&[1, 4096, 768], 1.0);
    let k = rng.tensor(&[1, 4096, 768], 1.0);
    let v = rng.tensor(&[1, 4096, 768], 1.0);
    let rh = rng.tensor(&[64, 64, 64], 0.05);
    let rw = rng.tensor(&[64, 64, 64], 0.05);
    // The two products (QK^T and PV): 4 x L^2 x C FLOPs.
    g.throughput(Throughput::Elements(4 * 4096 * 4096 * 768));
    for (name, be) in backends() {
        g.bench_function(
            format!("attention global 4096 tok 12x64 relpos {name}"),
            |bch| {
                bch.iter(|| {
                    let rel = RelPos::within(&rh, &rw, (64, 64));
                    be.attention(&q, &k, &v, 12, 0.125, Some(rel)).unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
