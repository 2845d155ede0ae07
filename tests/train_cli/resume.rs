//! `train --resume` continues an interrupted run exactly where the uninterrupted run ends.

use std::path::Path;

use medsa::train::checkpoint::read_tensors;
use serde_json::Value;

use super::{
    init_tiny, max_abs_diff, metadata, png_dataset, read_log, run_err, run_ok, scratch, step_lines,
    train,
};

#[test]
fn resume_continues_exactly() {
    let d = scratch("resume");
    let base = d.join("base.safetensors");
    init_tiny(&base, 0);
    let data = d.join("data");
    png_dataset(&data, 6);
    // Everything trained (f32 masters of the whole encoder and decoder), and new adapters
    // trained with the decoder (the adapters must come back from `last`, not be re-drawn).
    // The second configuration also accumulates 2 micro-batches of 3 (4 training cases: step 4
    // ends mid-epoch) and clips the gradient norm.
    for (trainable, add, batch, accumulate, clip) in [
        ("all", "none", "2", "1", "100"),
        ("adapters+decoder", "encoder+decoder", "3", "2", "0.05"),
    ] {
        let args = [
            "--trainable",
            trainable,
            "--add-adapters",
            add,
            "--batch-size",
            batch,
            "--accumulate",
            accumulate,
            "--clip",
            clip,
            "--lr",
            "2e-3",
            "--val-fraction",
            "0.34",
            "--save-every",
            "4",
            "--seed",
            "7",
        ];
        let (a, b) = (
            d.join(format!("{trainable}-a")),
            d.join(format!("{trainable}-b")),
        );
        run_ok(train(&base, &data, &a).args(args).args(["--steps", "8"]));
        run_ok(train(&base, &data, &b).args(args).args(["--steps", "4"]));
        assert_eq!(metadata(&b.join("last.safetensors"))["step"], "4");
        let text = run_ok(
            train(&base, &data, &b)
                .args(args)
                .args(["--steps", "8", "--resume"]),
        );
        assert!(text.contains("train: steps 4..8"), "{trainable}: {text}");
        check_same_run(trainable, &a, &b);
    }

    // Warm-up + cosine: the rate follows the restored step count, so the resumed run's rates of
    // steps 5..8 are those of the uninterrupted 8-step run (its first 4 steps ran under a 4-step
    // schedule, so only the rates can be compared).
    let args = [
        "--trainable",
        "adapters",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--val-fraction",
        "0",
    ];
    let (a, b) = (d.join("cos-a"), d.join("cos-b"));
    run_ok(train(&base, &data, &a).args(args).args(["--steps", "8"]));
    run_ok(train(&base, &data, &b).args(args).args(["--steps", "4"]));
    run_ok(
        train(&base, &data, &b)
            .args(args)
            .args(["--steps", "8", "--resume"]),
    );
    let lrs = |dir: &Path| -> Vec<(u64, f64)> {
        step_lines(&read_log(&dir.join("log.jsonl")))
            .iter()
            .map(|v| (v["step"].as_u64().unwrap(), v["lr"].as_f64().unwrap()))
            .collect()
    };
    let (la, lb) = (lrs(&a), lrs(&b));
    assert_eq!(la.len(), 8);
    assert_eq!(la[4..], lb[4..], "rates after resuming");
    assert!(
        la[0].1 < la[1].1 && la[7].1 < la[2].1,
        "warm-up then decay: {la:?}"
    );

    // Resuming with another trainable set is refused.
    let e = run_err(
        train(&base, &data, &b)
            .args(["--trainable", "adapters+decoder", "--val-fraction", "0"])
            .args(["--steps", "9", "--resume"]),
    );
    assert!(e.contains("--trainable adapters"), "{e}");
}

/// Asserts that run `b` (interrupted and resumed) ended where the uninterrupted run `a` did.
fn check_same_run(what: &str, a: &Path, b: &Path) {
    // The log of B continues at step 5, with the same losses as the uninterrupted run.
    let (log_a, log_b) = (
        read_log(&a.join("log.jsonl")),
        read_log(&b.join("log.jsonl")),
    );
    let (sa, sb) = (step_lines(&log_a), step_lines(&log_b));
    let nums = |s: &[&Value]| {
        s.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        nums(&sb),
        (1..=8).collect::<Vec<u64>>(),
        "{what}: {log_b:?}"
    );
    assert_eq!(nums(&sa), nums(&sb));
    for (x, y) in sa.iter().zip(&sb) {
        for k in ["loss", "lr", "grad_norm"] {
            assert_eq!(
                x[k].as_f64(),
                y[k].as_f64(),
                "{what}: step {}: {k} differs between the uninterrupted and the resumed run",
                x["step"]
            );
        }
    }

    // The final checkpoints agree: tensors bit for bit, metadata too.
    let (ta, tb) = (
        read_tensors(&a.join("last.safetensors")).unwrap(),
        read_tensors(&b.join("last.safetensors")).unwrap(),
    );
    let (diff, key) = max_abs_diff(&ta, &tb);
    assert_eq!(
        diff, 0.0,
        "{what}: resumed run differs from the uninterrupted one at `{key}`"
    );
    assert_eq!(
        metadata(&a.join("last.safetensors")),
        metadata(&b.join("last.safetensors")),
        "{what}"
    );
    let (sta, stb) = (
        read_tensors(&a.join("last.state.safetensors")).unwrap(),
        read_tensors(&b.join("last.state.safetensors")).unwrap(),
    );
    let (diff, key) = max_abs_diff(&sta, &stb);
    assert_eq!(diff, 0.0, "{what}: optimiser state differs at `{key}`");
    let (ma, mb) = (
        metadata(&a.join("last.state.safetensors")),
        metadata(&b.join("last.state.safetensors")),
    );
    for k in ["step", "rng", "optim_steps"] {
        assert_eq!(ma[k], mb[k], "{what}: state metadata `{k}`");
    }
}
