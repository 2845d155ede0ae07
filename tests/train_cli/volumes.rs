//! Volume training on single slices and on depth chunks.

use medsa::data::nifti::read_nifti;
use medsa::train::checkpoint::read_tensors;

use super::{bin, init_tiny, metadata, nifti_case, read_log, run_ok, scratch, step_lines, train};

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
