//! End-to-end tests of `medsa-engine init`, `train`, `merge` and `segment`/`forward --adapter`
//! on a tiny randomly initialised model and synthetic datasets: what a run writes, that the loss
//! falls on a trivially learnable task, that `--resume` continues exactly, that adapter files
//! carry only adapters and the base's hash, that a merged checkpoint predicts what base + adapter
//! predict, volume training on single slices and on depth chunks, and that bad requests fail
//! with a message naming the problem instead of a panic.

#[path = "../common/mod.rs"]
mod common;

mod adapters_and_merge;
mod bad_requests;
mod diverging;
mod init_and_train;
#[cfg(feature = "cuda")]
mod on_cuda;
mod reference_flavour;
mod resume;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use medsa::data::nifti::{read_nifti, write_f32, write_labels};
use medsa::weights::SafetensorsFile;
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
