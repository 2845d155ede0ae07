//! The host side of a training step: AdamW over the trained parameters of vit_b with Med-SA
//! adapters + the mask decoder (13,594,980 values, the count `medsa-engine bench --train`
//! trains). On CUDA this runs on the host between the device's backward and the next forward,
//! so its time adds to every step. Compare the two lines: one thread against the whole pool.

use criterion::{criterion_group, criterion_main, Criterion};
use medsa::sam::random::Rng;
use medsa::train::optim::{
    adamw_step, adamw_step_many, clip_grad_norm, AdamWConfig, AdamWItem, AdamWState,
};

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

    // The same count as 600 tensors of 22,658 values (most trained tensors are adapter and
    // decoder matrices far below the 32768-value chunk): one tensor at a time leaves the pool
    // idle, the joint pass spreads the tensors over it.
    let (k, len) = (600, 22_658);
    let mut ps: Vec<Vec<f32>> = (0..k).map(|_| rng.tensor(&[len], 1.0).into_vec()).collect();
    let gs: Vec<Vec<f32>> = (0..k)
        .map(|_| rng.tensor(&[len], 0.01).into_vec())
        .collect();
    let mut sts: Vec<AdamWState> = (0..k).map(|_| AdamWState::default()).collect();
    let mut grp = c.benchmark_group("adamw 600 tensors of 22658 values");
    grp.sample_size(10);
    grp.bench_function("adamw_step per tensor", |b| {
        b.iter(|| {
            for ((p, g), st) in ps.iter_mut().zip(&gs).zip(sts.iter_mut()) {
                adamw_step(&cfg, 1e-4, p, g, st).unwrap();
            }
        })
    });
    grp.bench_function("adamw_step_many", |b| {
        b.iter(|| {
            let mut items: Vec<AdamWItem> = ps
                .iter_mut()
                .zip(&gs)
                .zip(sts.iter_mut())
                .map(|((param, grad), state)| AdamWItem {
                    name: "t",
                    param,
                    grad,
                    state,
                })
                .collect();
            adamw_step_many(&cfg, 1e-4, &mut items).unwrap()
        })
    });
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
