//! `init` then `train` on a tiny model: the checkpoints and log a run writes, and a loss that
//! falls on a trivially learnable task.

use medsa::train::checkpoint::read_tensors;
use medsa::train::sha256::sha256_file;
use serde_json::Value;

use super::{bin, init_tiny, metadata, png_dataset, read_log, run_ok, scratch, step_lines, train};

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn init_then_train_writes_checkpoints_and_log_and_learns() {
    let d = scratch("learn");
    let base = d.join("base.safetensors");
    init_tiny(&base, 0);
    run_ok(bin().arg("info").arg(&base));
    let data = d.join("data");
    png_dataset(&data, 6);
    let out = d.join("run");
    let t0 = std::time::Instant::now();
    let text = run_ok(train(&base, &data, &out).args([
        "--trainable",
        "all",
        "--add-adapters",
        "none",
        "--steps",
        "30",
        "--lr",
        "2e-3",
        "--val-fraction",
        "0.34",
        "--val-every",
        "10",
        "--save-every",
        "10",
    ]));
    eprintln!("30 steps in {:.1} s", t0.elapsed().as_secs_f64());
    assert!(text.contains("train: steps 0..30"), "{text}");
    for f in [
        "last.safetensors",
        "last.state.safetensors",
        "best.safetensors",
        "log.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing: {text}");
    }
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.contains(".tmp")), "{left:?}");

    // The log: one line per step with the documented keys, validation lines with val_dice.
    let log = read_log(&out.join("log.jsonl"));
    let steps = step_lines(&log);
    assert_eq!(steps.len(), 30, "{log:?}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"].as_u64(), Some(i as u64 + 1), "{s}");
        for k in ["loss", "lr", "grad_norm", "images_per_s"] {
            let v = s[k].as_f64().unwrap_or_else(|| panic!("{k} in {s}"));
            assert!(v.is_finite(), "{k} in {s}");
        }
        assert_eq!(s["lr"].as_f64(), Some(2e-3), "{s}");
        assert_eq!(s["images"].as_u64(), Some(2), "{s}");
    }
    let vals: Vec<&Value> = log.iter().filter(|v| v.get("val_dice").is_some()).collect();
    let val_steps: Vec<u64> = vals.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(val_steps, [0, 10, 20, 30], "{vals:?}");
    for v in &vals {
        let dice = v["val_dice"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&dice), "{v}");
        assert_eq!(v["val_images"].as_u64(), Some(2), "{v}");
    }

    // Learning: the mean loss of the last 5 steps is well below that of the first 5.
    let losses: Vec<f64> = steps.iter().map(|s| s["loss"].as_f64().unwrap()).collect();
    let (first, last) = (mean(&losses[..5]), mean(&losses[25..]));
    eprintln!("loss {first:.4} -> {last:.4}: {losses:.3?}");
    assert!(
        last < 0.8 * first,
        "training loss did not fall: {first:.4} -> {last:.4} ({losses:.3?})"
    );

    // Checkpoints: last holds every trained tensor with the run's metadata; best is the best
    // validation Dice's step.
    let meta = metadata(&out.join("last.safetensors"));
    assert_eq!(meta["format"], "medsa-adapter/1");
    assert_eq!(meta["trainable"], "all");
    assert_eq!(meta["step"], "30");
    assert_eq!(meta["model_size"], "32");
    assert_eq!(meta["base_sha256"], sha256_file(&base).unwrap());
    let last = read_tensors(&out.join("last.safetensors")).unwrap();
    assert!(last.keys().any(|k| k.starts_with("image_encoder.")));
    assert!(last.keys().any(|k| k.starts_with("mask_decoder.")));
    assert!(
        !last.keys().any(|k| k.starts_with("prompt_encoder.")),
        "the prompt encoder is frozen"
    );
    let best_dice = vals
        .iter()
        .map(|v| v["val_dice"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    let best_meta = metadata(&out.join("best.safetensors"));
    let best_step: u64 = best_meta["step"].parse().unwrap();
    assert!(
        vals.iter()
            .any(|v| v["step"].as_u64() == Some(best_step)
                && v["val_dice"].as_f64() == Some(best_dice)),
        "best.safetensors is from step {best_step}, best Dice {best_dice}: {vals:?}"
    );
    // The trained model is usable: merge it and segment a training image.
    let merged = d.join("merged.safetensors");
    run_ok(
        bin()
            .arg("merge")
            .arg("--checkpoint")
            .arg(&base)
            .arg("--adapter")
            .arg(out.join("last.safetensors"))
            .arg("--out")
            .arg(&merged),
    );
    run_ok(bin().arg("info").arg(&merged));
}
