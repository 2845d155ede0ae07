//! End-to-end tests of the `medsa-engine` binary: `forward` reproduces a golden fixture,
//! `info` reports the inferred configuration, `segment` writes a mask at the image's size, and
//! bad input fails with a message that names the problem.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{compare, fixture, open, rms};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medsa-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "command failed: {cmd:?}\nstdout: {so}\nstderr: {se}"
    );
    format!("{so}{se}")
}

fn run_err(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded: {cmd:?}"
    );
    assert!(!se.contains("panicked"), "command panicked: {se}");
    se
}

/// `forward` on both fixture cases, with `device` args, against the fixture outputs; `setup`
/// prepares each command (false: skip).
fn check_forward(tag: &str, device: &[&str], setup: impl Fn(&mut Command) -> bool) {
    for (case, run) in [("tiny", "points"), ("volume", "per_token")] {
        let dir = tmpdir(&format!("fwd-{tag}-{case}"));
        let out = dir.join("out.safetensors");
        let mut cmd = bin();
        cmd.arg("forward")
            .arg("--checkpoint")
            .arg(fixture(case, "weights"))
            .arg("--inputs")
            .arg(fixture(case, run))
            .arg("--out")
            .arg(&out)
            .args(device);
        if !setup(&mut cmd) {
            return;
        }
        run_ok(&mut cmd);
        let want = open(case, run);
        let got = medsa::weights::SafetensorsFile::open(&out).unwrap();
        for k in [
            "image_embeddings",
            "low_res_masks",
            "iou_predictions",
            "masks",
        ] {
            let (g, w) = (got.tensor(k).unwrap(), want.tensor(k).unwrap());
            // Same tolerance and reasons as tests/fixtures.rs (f32 on both devices).
            compare(&format!("{case}/{run} {k}"), &g, &w, 1e-4, 1e-4 * rms(&w)).unwrap();
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn forward_reproduces_fixture_outputs() {
    check_forward("cpu", &[], |_| true);
}

/// The binary's CUDA path end to end (device selection, upload, the whole model, download), in
/// f32: on the GPU, or on the kernel emulator without one.
#[cfg(feature = "cuda")]
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn forward_on_cuda_reproduces_fixture_outputs() {
    check_forward("cuda", &["--device", "cuda", "--precision", "f32"], |cmd| {
        common::kemu::cuda_command("forward_on_cuda_reproduces_fixture_outputs", cmd)
    });
}

#[test]
fn info_reports_inferred_config_and_counts() {
    let s = run_ok(bin().arg("info").arg(fixture("tiny", "weights")));
    assert!(s.contains("embed 32, depth 2, heads 2"), "{s}");
    assert!(s.contains("window 4, global blocks [1]"), "{s}");
    assert!(s.contains("space 2 / mlp 2 / depth 0 of 2 blocks"), "{s}");
    assert!(s.contains("hyper 2 / mlp 2 / cross 2"), "{s}");
    let s = run_ok(bin().arg("info").arg(fixture("sam_geom", "weights")));
    assert!(s.contains("input           1024x1024 px"), "{s}");
    assert!(s.contains("window 14, global blocks [1]"), "{s}");
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/phantom.png")
}

#[test]
fn segment_writes_mask_at_image_size() {
    let dir = tmpdir("seg");
    let out = dir.join("mask.png");
    let s = run_ok(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(fixture("tiny", "weights"))
            .arg("--image")
            .arg(example())
            .args([
                "--point",
                "128,80",
                "--point",
                "60,78,0",
                "--box",
                "100,50,170,120",
                "--multimask",
            ])
            .arg("--out")
            .arg(&out),
    );
    assert!(s.contains("192x160"), "{s}");
    let img = image::open(&out).unwrap().to_luma8();
    assert_eq!((img.width(), img.height()), (192, 160));
    assert!(img.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    // No temporary file is left next to the output.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn segment_rejects_prompts_outside_the_image() {
    let dir = tmpdir("seg-bad");
    let e = run_err(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(fixture("tiny", "weights"))
            .arg("--image")
            .arg(example())
            .args(["--point", "500,10"])
            .arg("--out")
            .arg(dir.join("m.png")),
    );
    assert!(e.contains("outside the 192x160 image"), "{e}");
    assert!(!dir.join("m.png").exists());
}

#[test]
fn missing_files_and_devices_are_clear_errors() {
    let e = run_err(bin().arg("info").arg("/nonexistent/model.safetensors"));
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
    let e = run_err(
        bin()
            .arg("forward")
            .arg("--checkpoint")
            .arg(fixture("tiny", "weights"))
            .arg("--inputs")
            .arg(fixture("tiny", "weights"))
            .arg("--out")
            .arg("/tmp/never.safetensors"),
    );
    assert!(e.contains("missing tensor `images`"), "{e}");
    let e = run_err(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(fixture("tiny", "weights"))
            .arg("--image")
            .arg(example())
            .args(["--point", "1,1", "--device", "cuda:99"])
            .arg("--out")
            .arg("/tmp/never.png"),
    );
    // No driver, no such device, or no CUDA build: each names the device asked for.
    assert!(e.contains("cuda:99"), "{e}");
    let e = run_err(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(fixture("tiny", "weights"))
            .arg("--image")
            .arg(fixture("tiny", "weights"))
            .args(["--point", "1,1", "--out", "/tmp/never.png"]),
    );
    assert!(e.contains("cannot decode image"), "{e}");
}

#[test]
fn eval_scores_png_masks_and_reports_bad_cases() {
    let dir = tmpdir("eval");
    let (pd, gd) = (dir.join("pred"), dir.join("gt"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&gd).unwrap();
    let square = |x0: u32| {
        image::GrayImage::from_fn(10, 10, |x, y| {
            image::Luma([if (2..6).contains(&y) && (x0..x0 + 4).contains(&x) {
                255
            } else {
                0
            }])
        })
    };
    square(2).save(pd.join("a.png")).unwrap();
    square(4).save(gd.join("a.png")).unwrap();
    square(2).save(pd.join("b.png")).unwrap();
    square(2).save(gd.join("b.png")).unwrap();
    let csv = dir.join("m.csv");
    run_ok(bin().arg("eval").arg(&pd).arg(&gd).arg("--out").arg(&csv));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("case,dice,iou,hd95\n"), "{text}");
    assert!(text.contains("a.png,0.500000,0.333333,"), "{text}");
    assert!(text.contains("b.png,1.000000,1.000000,0.000000"), "{text}");
    assert!(text.contains("mean,0.750000,"), "{text}");
    // A ground truth of another size is reported by name, and the run fails.
    image::GrayImage::new(5, 5).save(gd.join("b.png")).unwrap();
    let e = run_err(bin().arg("eval").arg(&pd).arg(&gd));
    assert!(
        e.contains("b.png") && e.contains("1 of 2 cases failed"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
