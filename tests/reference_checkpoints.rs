//! Checkpoints saved by the public Med-SA code (SPEC section 7), end to end through the binary:
//! `info` reads their true native size, windows and decoder flavour; `forward` loads them with no
//! renaming, takes integer point labels as the reference writes them and reproduces the
//! reference decoder; `--decoder-flavour` forces the other block (and so changes the masks); a
//! non-integral label is an error naming it. Also the bundled model's metadata at work: the raw
//! MNI152 T1 segmented with no intensity or label flag.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{compare, fixture, open, rms};
use medsa::weights::{save_safetensors, SafetensorsFile};
use medsa::Tensor;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medsa-engine"))
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reference-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command, ok: bool) -> String {
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.success(), ok, "{cmd:?}\n{text}");
    assert!(!text.contains("panicked"), "{cmd:?} panicked\n{text}");
    text
}

fn forward(run_name: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("forward")
        .arg("--checkpoint")
        .arg(fixture("reference", "weights"))
        .arg("--inputs")
        .arg(fixture("reference", run_name))
        .arg("--out")
        .arg(out)
        .args(extra);
    c
}

#[test]
fn info_reads_the_native_size_windows_and_flavour_of_a_reference_checkpoint() {
    let text = run(bin().arg("info").arg(fixture("reference", "weights")), true);
    // The position embedding is stored at 64x64 (1024 / 16); the global block's tables say 6x6.
    for want in [
        "input           96x96 px (native), patch 16, token grid 6x6",
        "stored at 64x64 tokens",
        "global blocks [1]",
        "per block     [4, global]",
        "decoder         medsa flavour (inferred: block MLPs named mlp.layers.0.0 / mlp.fc",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let forced = run(
        bin()
            .arg("info")
            .arg(fixture("reference", "weights"))
            .args(["--decoder-flavour", "sam"]),
        true,
    );
    assert!(
        forced.contains("sam flavour (forced by --decoder-flavour)"),
        "{forced}"
    );
    // An official-layout checkpoint stays SAM's.
    let sam = run(bin().arg("info").arg(fixture("tiny", "weights")), true);
    assert!(
        sam.contains("sam flavour (inferred: SAM's key names)"),
        "{sam}"
    );
}

#[test]
fn forward_reproduces_the_reference_decoder_with_integer_labels() {
    let f = open("reference", "points_box");
    let labels = f.tensor_numeric("point_labels").unwrap();
    assert!(
        f.tensor("point_labels").is_err(),
        "the fixture should store point_labels as integers"
    );
    assert!(!labels.data().is_empty());
    for (run_name, extra) in [
        ("points_box", &[][..]),
        ("classes", &[][..]),
        ("volume_compat", &[][..]),
    ] {
        let d = scratch(&format!("fwd-{run_name}"));
        let out = d.join("out.safetensors");
        run(&mut forward(run_name, &out, extra), true);
        let want = open("reference", run_name);
        let got = SafetensorsFile::open(&out).unwrap();
        for k in ["low_res_masks", "iou_predictions", "masks"] {
            let (g, w) = (got.tensor(k).unwrap(), want.tensor(k).unwrap());
            // As tests/fixtures.rs: f32 on both sides, different summation orders.
            compare(&format!("{run_name} {k}"), &g, &w, 1e-4, 1e-4 * rms(&w)).unwrap();
        }
    }
}

#[test]
fn forcing_sams_block_on_a_reference_checkpoint_changes_the_masks() {
    let d = scratch("forced");
    let out = d.join("out.safetensors");
    run(
        &mut forward("points_box", &out, &["--decoder-flavour", "sam"]),
        true,
    );
    let want = open("reference", "points_box")
        .tensor("low_res_masks")
        .unwrap();
    let got = SafetensorsFile::open(&out)
        .unwrap()
        .tensor("low_res_masks")
        .unwrap();
    let worst = got
        .data()
        .iter()
        .zip(want.data())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst > 0.1 * rms(&want),
        "SAM's block on reference weights should not reproduce the reference (max diff {worst}, rms {})",
        rms(&want)
    );
}

#[test]
fn a_non_integral_point_label_is_an_error_naming_it() {
    let d = scratch("bad-label");
    let inputs = d.join("in.safetensors");
    let f = open("reference", "points_box");
    let images = f.tensor("images").unwrap();
    let coords = f.tensor("point_coords").unwrap();
    let mut labels = f.tensor_numeric("point_labels").unwrap().into_vec();
    labels[1] = 0.5;
    let lshape = [coords.shape()[0], coords.shape()[1]];
    save_safetensors(
        &inputs,
        &[
            ("images".into(), images),
            ("point_coords".into(), coords),
            (
                "point_labels".into(),
                Tensor::from_vec(labels, &lshape).unwrap(),
            ),
        ],
        &HashMap::new(),
    )
    .unwrap();
    let err = run(
        bin()
            .arg("forward")
            .arg("--checkpoint")
            .arg(fixture("reference", "weights"))
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(d.join("out.safetensors")),
        false,
    );
    assert!(
        err.contains("tensor `point_labels` element 1 is 0.5: expected a whole number"),
        "{err}"
    );
}

/// The raw MNI152 T1 (not the demo's slabs) with the bundled model and only label prompts: its
/// metadata supplies the intensity window, preset and label id it was trained with. Needs the
/// example data, which `scripts/test.sh` fetches (MEDSA_EXAMPLE_DATA=1 makes its absence an
/// error); a bare `cargo test` without it skips with the reason.
#[test]
fn bundled_model_on_the_raw_mni152_uses_its_metadata() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let t1 = root.join("examples/data/mni152_t1.nii.gz");
    let labels = root.join("examples/data/mni152_labels.nii.gz");
    if !t1.exists() || !labels.exists() {
        assert!(
            std::env::var_os("MEDSA_EXAMPLE_DATA").is_none(),
            "MEDSA_EXAMPLE_DATA is set but {} or {} is missing",
            t1.display(),
            labels.display()
        );
        eprintln!(
            "skipped: {} is absent (scripts/fetch-example.sh and scripts/prepare-mni152.py make it)",
            t1.display()
        );
        return;
    }
    let d = scratch("mni");
    let text = run(
        bin()
            .arg("segment")
            .arg("--checkpoint")
            .arg(root.join("examples/models/mni152_gm.safetensors"))
            .arg("-i")
            .arg(&t1)
            .arg("-o")
            .arg(&d)
            .arg("--prompt-from-label")
            .arg(&labels)
            .arg("--labels")
            .arg(&labels)
            .arg("--quiet"),
        true,
    );
    assert!(text.contains("window:0,255"), "{text}");
    let csv = std::fs::read_to_string(d.join("metrics.csv")).unwrap();
    let mean = csv.lines().last().unwrap();
    let dice: f64 = mean.split(',').nth(1).unwrap().parse().unwrap();
    // 0.65 is what `--intensity mr` scored before the model carried its metadata (0.74 now);
    // the CT window that was the silent default scored 0.0005.
    assert!(dice >= 0.65, "grey-matter Dice {dice} (metrics: {csv})");
}
