//! `train --device cuda` end to end in f32 (on the GPU, or on the kernel emulator without one):
//! the same run as on the CPU gives the same losses step by step and a checkpoint with the
//! same weights, up to f32 summation order.

use medsa::train::checkpoint::read_tensors;

use super::{
    common, init_tiny, max_abs_diff, png_dataset, read_log, run_ok, scratch, step_lines, train,
};

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn train_on_cuda_matches_train_on_cpu() {
    let test = "train_on_cuda_matches_train_on_cpu";
    let d = scratch("on-cuda");
    let base = d.join("base.safetensors");
    init_tiny(&base, 3);
    let data = d.join("data");
    png_dataset(&data, 6);
    let args = [
        "--trainable",
        "adapters+decoder",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--val-fraction",
        "0.34",
        "--val-every",
        "3",
        "--save-every",
        "3",
    ];
    let (cpu_out, cuda_out) = (d.join("cpu"), d.join("cuda"));
    let mut cuda = train(&base, &data, &cuda_out);
    cuda.args(args)
        .args(["--device", "cuda", "--precision", "f32"]);
    if !common::kemu::cuda_command(test, &mut cuda) {
        return;
    }
    run_ok(train(&base, &data, &cpu_out).args(args));
    run_ok(&mut cuda);
    let (lc, lg) = (
        read_log(&cpu_out.join("log.jsonl")),
        read_log(&cuda_out.join("log.jsonl")),
    );
    let (sc, sg) = (step_lines(&lc), step_lines(&lg));
    assert_eq!(sc.len(), 6, "{lc:?}");
    assert_eq!(sg.len(), 6, "{lg:?}");
    for (i, (a, b)) in sc.iter().zip(&sg).enumerate() {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        // f32 on both, summed in other orders; Adam's m / sqrt(v) amplifies the differences of
        // near-zero gradients a little over 6 steps (tests/train_grad.rs has the reasons).
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "step {i}: loss {b} on CUDA, {a} on the CPU"
        );
    }
    let (wc, wg) = (
        read_tensors(&cpu_out.join("last.safetensors")).unwrap(),
        read_tensors(&cuda_out.join("last.safetensors")).unwrap(),
    );
    let (diff, key) = max_abs_diff(&wc, &wg);
    assert!(diff <= 1e-3, "last checkpoint: {key} differs by {diff}");
}
