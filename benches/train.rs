//! The host side of a training step: AdamW over the trained parameters of vit_b with Med-SA
//! adapters + the mask decoder (13,594,980 values, the count `medsa-engine bench --train`
//! trains). On CUDA this runs on the host between the device's backward and the next forward,
//! so its time adds to every step. Compare the two lines: one thread against the whole pool.

use criterion::{criterion_group, criterion_main, Criterion};
use medsa::sam::random::Rng;
use medsa::train::optim::{adamw_step, clip_grad_norm, AdamWConfig, AdamWState};

fn adamw(c: &mut Criterion) {
    let n = 13_594_980;
    let mut rng = Rng::new(3);
    let mut p = rng.tensor(&[n], 1.0).into_vec();
    let g = rng.tensor(&[n], 0.01).into_vec();
    let cfg = AdamWConfig::default();
    let mut st = AdamWState::default();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let mut grp = c.benchmark_group("adamw_step 13.6M parameters");
    grp.sample_size(10);
    grp.bench_function("1 thread", |b| {
        b.iter(|| one.install(|| adamw_step(&cfg, 1e-4, &mut p, &g, &mut st).unwrap()))
    });
    grp.bench_function(
        format!("{} threads (rayon pool)", rayon::current_num_threads()),
        |b| b.iter(|| adamw_step(&cfg, 1e-4, &mut p, &g, &mut st).unwrap()),
    );
    grp.finish();

    // Global gradient-norm clipping over the same values (norm, then a scaling pass: a limit
    // below the norm, so both passes run).
    let mut g = g;
    let mut grp = c.benchmark_group("clip_grad_norm 13.6M gradients");
    grp.sample_size(10);
    grp.bench_function("1 thread", |b| {
        b.iter(|| one.install(|| clip_grad_norm(&mut [&mut g[..]], 1e-3)))
    });
    grp.bench_function(
        format!("{} threads (rayon pool)", rayon::current_num_threads()),
        |b| b.iter(|| clip_grad_norm(&mut [&mut g[..]], 1e-3)),
    );
    grp.finish();
}

criterion_group!(benches, adamw);
criterion_main!(benches);
