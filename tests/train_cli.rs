//! End-to-end tests of `medsa-engine init`, `train`, `merge` and `segment`/`forward --adapter`
//! on a tiny randomly initialised model and synthetic datasets: what a run writes, that the loss
//! falls on a trivially learnable task, that `--resume` continues exactly, that adapter files
//! carry only adapters and the base's hash, that a merged checkpoint predicts what base + adapter
//! predict, volume training on single slices and on depth chunks, and that bad requests fail
//! with a message naming the problem instead of a panic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::data::nifti::{read_nifti, write_f32, write_labels};
use medsa::train::checkpoint::read_tensors;
use medsa::train::sha256::sha256_file;
use medsa::weights::{save_safetensors, SafetensorsFile};
use medsa::Tensor;
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

/// A fresh, empty scratch folder for one test (left in place afterwards for inspection; the
/// next run clears it).
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("train-cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a command that must succeed; returns stdout + stderr.
fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "command failed: {cmd:?}\n{text}");
    assert!(
        !text.contains("panicked"),
        "command panicked: {cmd:?}\n{text}"
    );
    text
}

/// Runs a command that must fail cleanly (non-zero exit, no panic); returns stderr.
fn run_err(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded: {cmd:?}\n{se}"
    );
    assert_eq!(o.status.code(), Some(1), "exit status {:?}: {se}", o.status);
    assert!(!se.contains("panicked"), "command panicked: {cmd:?}\n{se}");
    assert!(se.contains("error: "), "no error line: {se}");
    se
}

/// `medsa-engine init` of a tiny model (32x32 input, 4x4 tokens, 2 blocks, width 32).
fn init_tiny(out: &Path, seed: u64) {
    run_ok(bin().arg("init").arg("--out").arg(out).args([
        "--size",
        "32",
        "--patch",
        "8",
        "--embed",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--window",
        "2",
        "--prompt-dim",
        "32",
        "--decoder-mlp",
        "64",
        "--seed",
        &seed.to_string(),
    ]));
}

/// Disc of case `i` in a 48x40 image: centre and radius.
fn disc(i: u32) -> (f32, f32, f32) {
    (
        14.0 + 4.0 * (i % 5) as f32,
        13.0 + 3.0 * (i % 4) as f32,
        7.0,
    )
}

/// `n` grey 48x40 PNG images of a bright disc on a dark, slightly textured background, with the
/// disc as label 1: foreground is exactly "bright".
fn png_dataset(root: &Path, n: u32) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..n {
        let (cx, cy, r) = disc(i);
        let inside = |x: u32, y: u32| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            dx * dx + dy * dy <= r * r
        };
        image::GrayImage::from_fn(48, 40, |x, y| {
            image::Luma([if inside(x, y) {
                220
            } else {
                (20 + (x * 3 + y * 5 + i * 7) % 30) as u8
            }])
        })
        .save(root.join(format!("images/case{i}.png")))
        .unwrap();
        image::GrayImage::from_fn(48, 40, |x, y| image::Luma([inside(x, y) as u8]))
            .save(root.join(format!("masks/case{i}.png")))
            .unwrap();
    }
}

/// A NIfTI-1 FLOAT32 volume written byte by byte (no sform/qform: spacing only).
fn write_nifti_by_hand(path: &Path, dims: [usize; 3], data: &[f32]) {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let dim: [i16; 8] = [
        3,
        dims[0] as i16,
        dims[1] as i16,
        dims[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (k, d) in dim.iter().enumerate() {
        h[40 + 2 * k..42 + 2 * k].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&16i16.to_le_bytes()); // datatype FLOAT32
    h[72..74].copy_from_slice(&32i16.to_le_bytes()); // bitpix
    let pixdim: [f32; 8] = [1.0, 1.0, 1.0, 2.5, 0.0, 0.0, 0.0, 0.0];
    for (k, p) in pixdim.iter().enumerate() {
        h[76 + 4 * k..80 + 4 * k].copy_from_slice(&p.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[123] = 2; // mm
    h[344..348].copy_from_slice(b"n+1\0");
    for v in data {
        h.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, h).unwrap();
}

/// Volume case `name` of 32x32x6 voxels with intensities in [0, 1]: a bright disc (label 1) in
/// slices 1..=4 centred at (cx, cy), a dim texture elsewhere.
fn nifti_case(root: &Path, name: &str, cx: f32, cy: f32) {
    let [nx, ny, nz] = [32, 32, 6];
    let fg = |x: usize, y: usize, z: usize| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        (1..=4).contains(&z) && dx * dx + dy * dy <= 36.0
    };
    let mut img = Vec::with_capacity(nx * ny * nz);
    let mut lab = Vec::with_capacity(nx * ny * nz);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let f = fg(x, y, z);
                img.push(if f {
                    0.9
                } else {
                    0.1 + ((x * 3 + y * 5 + z) % 10) as f32 * 0.01
                });
                lab.push(f as u8);
            }
        }
    }
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("labels")).unwrap();
    let raw = root.join(format!("{name}.raw.nii"));
    write_nifti_by_hand(&raw, [nx, ny, nz], &img);
    let like = read_nifti(&raw).unwrap();
    assert_eq!(like.dims, [nx, ny, nz]);
    assert_eq!(like.data, img, "hand-written NIfTI reads back");
    // Through medsa's writers: gzip image, plain label volume on the same grid.
    write_f32(
        &root.join(format!("images/{name}.nii.gz")),
        &like.header,
        &img,
    )
    .unwrap();
    write_labels(&root.join(format!("labels/{name}.nii")), &like.header, &lab).unwrap();
    std::fs::remove_file(raw).unwrap();
}

/// `train` with the common arguments of these tests.
fn train(base: &Path, data: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.arg("train")
        .arg("--checkpoint")
        .arg(base)
        .arg("--data")
        .arg(data)
        .arg("-o")
        .arg(out)
        .arg("--quiet");
    c
}

/// The lines of a log.jsonl, parsed.
fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path:?}: {l}: {e}")))
        .collect()
}

/// Training-step lines (those with a `loss`) of a log.
fn step_lines(log: &[Value]) -> Vec<&Value> {
    log.iter().filter(|v| v.get("loss").is_some()).collect()
}

fn metadata(path: &Path) -> HashMap<String, String> {
    SafetensorsFile::open(path).unwrap().metadata().clone()
}

/// Largest absolute difference of two checkpoints' tensors (same keys and shapes required).
fn max_abs_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> (f32, String) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let mut worst = (0f32, String::new());
    for (k, ta) in a {
        let tb = &b[k];
        assert_eq!(ta.shape(), tb.shape(), "{k}");
        for (x, y) in ta.data().iter().zip(tb.data()) {
            let d = (x - y).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, k.clone());
            }
        }
    }
    worst
}

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

/// `forward` inputs: one 32x32 image and a foreground click.
fn forward_inputs(path: &Path) {
    let img: Vec<f32> = (0..3 * 32 * 32)
        .map(|i| {
            let (y, x) = ((i / 32) % 32, i % 32);
            let (dx, dy) = (x as f32 - 14.0, y as f32 - 12.0);
            if dx * dx + dy * dy < 30.0 {
                0.9
            } else {
                0.1
            }
        })
        .collect();
    save_safetensors(
        path,
        &[
            (
                "images".into(),
                Tensor::from_vec(img, &[1, 3, 32, 32]).unwrap(),
            ),
            (
                "point_coords".into(),
                Tensor::from_vec(vec![14.0, 12.0], &[1, 1, 2]).unwrap(),
            ),
            (
                "point_labels".into(),
                Tensor::from_vec(vec![1.0], &[1, 1]).unwrap(),
            ),
        ],
        &HashMap::new(),
    )
    .unwrap();
}

#[test]
fn adapters_on_a_plain_model_merge_and_segment() {
    let d = scratch("adapters");
    let base = d.join("base.safetensors");
    init_tiny(&base, 0);
    let data = d.join("data");
    png_dataset(&data, 6);
    let out = d.join("run");
    run_ok(train(&base, &data, &out).args([
        "--trainable",
        "adapters",
        "--add-adapters",
        "encoder+decoder",
        "--steps",
        "4",
        "--lr",
        "1e-2",
        "--val-fraction",
        "0.34",
    ]));
    let adapter = out.join("last.safetensors");

    // Only adapter tensors, in the documented format, tied to the base by hash.
    let t = read_tensors(&adapter).unwrap();
    assert!(!t.is_empty());
    let bad: Vec<&String> = t.keys().filter(|k| !k.contains("_Adapter.")).collect();
    assert!(
        bad.is_empty(),
        "non-adapter tensors in the adapter file: {bad:?}"
    );
    for want in [
        "image_encoder.blocks.0.Space_Adapter.D_fc1.weight",
        "image_encoder.blocks.1.MLP_Adapter.D_fc2.bias",
        "mask_decoder.transformer.layers.0.Hyper_Adapter.hyper.0.weight",
        "mask_decoder.transformer.layers.1.Cross_Adapter.D_fc2.weight",
    ] {
        assert!(t.contains_key(want), "{want} missing: {:?}", t.keys());
    }
    assert!(
        !t.keys().any(|k| k.contains("Depth_Adapter")),
        "depth adapters were not asked for"
    );
    let moved = t
        .iter()
        .filter(|(k, _)| k.contains("D_fc2.weight"))
        .any(|(_, v)| v.data().iter().any(|&x| x != 0.0));
    assert!(moved, "D_fc2 starts at zero and must have been trained");
    let meta = metadata(&adapter);
    assert_eq!(meta["format"], "medsa-adapter/1");
    assert_eq!(meta["base_sha256"], sha256_file(&base).unwrap());
    assert_eq!(meta["base_file"], "base.safetensors");
    assert_eq!(meta["trainable"], "adapters");
    assert_eq!(meta["preset"], "medsa");
    assert_eq!(meta["step"], "4");
    assert!(!meta.contains_key("intensity"), "2D training: {meta:?}");

    // Merge: a standalone checkpoint that `info` reads, with the adapters in it.
    let merged = d.join("merged.safetensors");
    run_ok(
        bin()
            .arg("merge")
            .arg("--checkpoint")
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&merged),
    );
    let info = run_ok(bin().arg("info").arg(&merged));
    assert!(
        info.contains("adapters        space 2 / mlp 2 / depth 0 of 2 blocks"),
        "{info}"
    );
    assert!(
        info.contains("adapters hyper 2 / mlp 2 / cross 2"),
        "{info}"
    );

    // segment: base + adapter gives the same mask as the merged checkpoint.
    let img = data.join("images/case1.png");
    let (cx, cy, _) = disc(1);
    let point = format!("{},{}", cx as u32, cy as u32);
    let seg = |ckpt: &Path, adapter: Option<&Path>, mask: &Path| {
        let mut c = bin();
        c.arg("segment").arg("--checkpoint").arg(ckpt);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        c.arg("--image")
            .arg(&img)
            .arg("--out")
            .arg(mask)
            .args(["--point", &point, "--preset", "medsa"]);
        run_ok(&mut c)
    };
    let (m_ad, m_merged, m_base) = (
        d.join("adapter.png"),
        d.join("merged.png"),
        d.join("base.png"),
    );
    let text = seg(&base, Some(&adapter), &m_ad);
    assert!(
        text.contains("trained as adapters for 4 steps (preset medsa, size 32)"),
        "{text}"
    );
    seg(&merged, None, &m_merged);
    seg(&base, None, &m_base);
    let (a, m) = (
        image::open(&m_ad).unwrap().to_luma8(),
        image::open(&m_merged).unwrap().to_luma8(),
    );
    assert_eq!((a.width(), a.height()), (48, 40));
    assert!(
        a == m,
        "segment --adapter and the merged checkpoint disagree"
    );

    // forward: the same outputs bit for bit, and different from the base model's.
    let inputs = d.join("inputs.safetensors");
    forward_inputs(&inputs);
    let fwd = |ckpt: &Path, adapter: Option<&Path>, out: &Path| {
        let mut c = bin();
        c.arg("forward").arg("--checkpoint").arg(ckpt);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        c.arg("--inputs").arg(&inputs).arg("--out").arg(out);
        run_ok(&mut c);
        read_tensors(out).unwrap()
    };
    let fa = fwd(&base, Some(&adapter), &d.join("fa.safetensors"));
    let fm = fwd(&merged, None, &d.join("fm.safetensors"));
    let fb = fwd(&base, None, &d.join("fb.safetensors"));
    let (diff, key) = max_abs_diff(&fa, &fm);
    assert_eq!(diff, 0.0, "forward --adapter and merged differ at `{key}`");
    let (diff, _) = max_abs_diff(&fa, &fb);
    assert!(diff > 0.0, "the trained adapters change nothing");
}

#[test]
fn bad_requests_fail_with_clear_messages() {
    let d = scratch("errors");
    let base = d.join("base.safetensors");
    init_tiny(&base, 0);
    let data = d.join("data");
    png_dataset(&data, 4);

    // A dataset without masks/.
    let no_masks = d.join("no-masks");
    std::fs::create_dir_all(no_masks.join("images")).unwrap();
    std::fs::copy(
        data.join("images/case0.png"),
        no_masks.join("images/case0.png"),
    )
    .unwrap();
    let e = run_err(train(&base, &no_masks, &d.join("o1")).args(["--steps", "1"]));
    assert!(e.contains("no masks/ folder"), "{e}");

    // A trainable pattern that matches nothing.
    let e = run_err(train(&base, &data, &d.join("o2")).args([
        "--steps",
        "1",
        "--add-adapters",
        "none",
        "--trainable",
        "image_encoder.blocks.*.No_Such_Adapter.*",
    ]));
    assert!(
        e.contains("No_Such_Adapter") && e.contains("matches no parameter"),
        "{e}"
    );

    // --resume with nothing to resume.
    let e = run_err(train(&base, &data, &d.join("o3")).args(["--steps", "2", "--resume"]));
    assert!(
        e.contains("--resume") && e.contains("last.safetensors"),
        "{e}"
    );
    assert!(e.contains("nothing to resume"), "{e}");

    // An adapter applied to a different base: refused, naming both files and hashes.
    let run = d.join("run");
    run_ok(train(&base, &data, &run).args([
        "--steps",
        "1",
        "--trainable",
        "adapters",
        "--val-fraction",
        "0",
    ]));
    let adapter = run.join("last.safetensors");
    let other = d.join("other.safetensors");
    init_tiny(&other, 1);
    let (h_base, h_other) = (sha256_file(&base).unwrap(), sha256_file(&other).unwrap());
    assert_ne!(h_base, h_other);
    let img = data.join("images/case0.png");
    let seg = |extra: &[&str]| {
        let mut c = bin();
        c.arg("segment")
            .arg("--checkpoint")
            .arg(&other)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--image")
            .arg(&img)
            .arg("--out")
            .arg(d.join("mask.png"))
            .args(["--point", "14,13"])
            .args(extra);
        c
    };
    let e = run_err(&mut seg(&[]));
    for want in [
        h_base.as_str(),
        h_other.as_str(),
        "base.safetensors",
        "other.safetensors",
    ] {
        assert!(e.contains(want), "mismatch message lacks {want}: {e}");
    }
    let e = run_err(
        bin()
            .arg("merge")
            .arg("--checkpoint")
            .arg(&other)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(d.join("m.safetensors")),
    );
    assert!(e.contains(&h_base) && e.contains(&h_other), "{e}");
    assert!(!d.join("m.safetensors").exists());
    run_ok(&mut seg(&["--allow-base-mismatch"]));
    run_ok(
        bin()
            .arg("merge")
            .arg("--checkpoint")
            .arg(&other)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(d.join("m.safetensors"))
            .arg("--allow-base-mismatch"),
    );
    run_ok(bin().arg("info").arg(d.join("m.safetensors")));
    assert!(d.join("mask.png").is_file());

    // Depth chunks on a model without depth adapters.
    let vols = d.join("vols");
    nifti_case(&vols, "a", 12.0, 14.0);
    nifti_case(&vols, "b", 18.0, 16.0);
    let e = run_err(train(&base, &vols, &d.join("o4")).args([
        "--steps",
        "1",
        "--add-adapters",
        "encoder",
        "--intensity",
        "none",
        "--depth",
        "3",
    ]));
    assert!(e.contains("Depth_Adapter"), "{e}");
}

#[test]
fn volumes_train_on_slices_and_on_depth_chunks() {
    let d = scratch("volumes");
    let base = d.join("base.safetensors");
    init_tiny(&base, 0);
    let data = d.join("vols");
    nifti_case(&data, "a", 12.0, 14.0);
    nifti_case(&data, "b", 18.0, 16.0);

    for (name, extra) in [
        ("slices", &[][..]),
        (
            "chunks",
            &["--add-adapters", "encoder+depth", "--depth", "3"][..],
        ),
    ] {
        let out = d.join(name);
        let text = run_ok(
            train(&base, &data, &out)
                .args([
                    "--steps",
                    "2",
                    "--intensity",
                    "none",
                    "--val-fraction",
                    "0.5",
                ])
                .args(extra),
        );
        assert!(text.contains("train: steps 0..2"), "{name}: {text}");
        let log = read_log(&out.join("log.jsonl"));
        let steps = step_lines(&log);
        assert_eq!(steps.len(), 2, "{name}: {log:?}");
        for s in &steps {
            assert!(s["loss"].as_f64().unwrap().is_finite(), "{name}: {s}");
        }
        // A batch of 2 samples: 2 slices, or 2 chunks of 3 slices.
        let per_step = if name == "chunks" { 6 } else { 2 };
        assert_eq!(
            steps[0]["images"].as_u64(),
            Some(per_step),
            "{name}: {log:?}"
        );
        assert!(
            log.iter().any(|v| v.get("val_dice").is_some()),
            "{name}: {log:?}"
        );
        let meta = metadata(&out.join("last.safetensors"));
        assert_eq!(meta["intensity"], "none", "{name}");
        assert_eq!(
            meta["loss_kind"], "DiceCe",
            "{name}: volumes default to DiceCE"
        );
        let t = read_tensors(&out.join("last.safetensors")).unwrap();
        let depth = t.keys().any(|k| k.contains("Depth_Adapter"));
        assert_eq!(depth, name == "chunks", "{name}: {:?}", t.keys());
        if name == "chunks" {
            assert_eq!(meta["depth"], "3");
        }
    }

    // The depth adapters segment a volume in chunks (intensities from the adapter's metadata).
    let seg = d.join("seg");
    let text = run_ok(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(&base)
            .arg("--adapter")
            .arg(d.join("chunks/last.safetensors"))
            .arg("-i")
            .arg(data.join("images/a.nii.gz"))
            .arg("-o")
            .arg(&seg)
            .args(["--box", "6,8,1,18,20,4", "--chunk", "3", "--quiet"]),
    );
    assert!(text.contains("1 of 1 cases done"), "{text}");
    let m = read_nifti(&seg.join("a.nii.gz")).unwrap();
    assert_eq!(m.dims, [32, 32, 6]);
    assert!(m.data.iter().all(|&v| v == 0.0 || v == 1.0));
}
