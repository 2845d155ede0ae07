//! The library entry points the Python package and the C ABI wrap ([`medsa::runtime::Model`]),
//! on the tiny fixture model and its `box` inputs: the Rust side of the binding-overhead
//! comparison (`tools/bench_bindings.sh` times the same calls from Python and the command line
//! in the same run).

use criterion::{criterion_group, criterion_main, Criterion};

use medsa::backend::RunOptions;
use medsa::runtime::{Model, ModelSource};
use medsa::sam::{MaskOutput, Prompts};
use medsa::weights::SafetensorsFile;

fn calls(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let model = Model::open(
        ModelSource::new(root.join("weights.safetensors"), None),
        "cpu",
        "f32",
        &RunOptions::default(),
    )
    .unwrap();
    let f = SafetensorsFile::open(root.join("box.safetensors")).unwrap();
    let images = f.tensor("images").unwrap();
    let prompts = Prompts::read(&f).unwrap();
    let shape: [usize; 4] = images.shape().try_into().unwrap();
    let emb = model.embed(images.data(), shape, None, None).unwrap();
    let sizes = (Some((96, 72)), Some((64, 48)));
    let mut g = c.benchmark_group("runtime");
    g.bench_function("decode tiny box", |b| {
        b.iter(|| {
            model
                .decode(&emb, &prompts, MaskOutput::Single, sizes.0, sizes.1)
                .unwrap()
        })
    });
    g.bench_function("embed+decode tiny box", |b| {
        b.iter(|| {
            let e = model.embed(images.data(), shape, None, None).unwrap();
            model
                .decode(&e, &prompts, MaskOutput::Single, sizes.0, sizes.1)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, calls);
criterion_main!(benches);
