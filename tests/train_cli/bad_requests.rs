//! Bad `train`, `segment` and `merge` requests fail with a message naming the problem instead
//! of a panic.

use medsa::train::sha256::sha256_file;

use super::{bin, init_tiny, nifti_case, png_dataset, run_err, run_ok, scratch, train};

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
