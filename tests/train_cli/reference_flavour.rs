//! Training on a checkpoint saved by the public Med-SA code (SPEC section 7): the adapter and the
//! merged model keep the reference's key names (so the reference code can load them back) and
//! record the decoder flavour and preprocessing, which `merge` carries into the standalone model
//! and `info` reports; `--decoder-flavour` overrides what the keys imply, all the way through.

use std::path::Path;

use medsa::train::checkpoint::read_tensors;

use super::common::fixture;
use super::{bin, metadata, png_dataset, run_err, run_ok, scratch, train};

/// Trains the reference fixture for two steps (adapters + decoder), merges, and returns the
/// adapter and merged paths.
fn train_and_merge(d: &Path, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = fixture("reference", "weights");
    let data = d.join("data");
    png_dataset(&data, 4);
    let out = d.join("run");
    run_ok(
        train(&base, &data, &out)
            .args([
                "--trainable",
                "adapters+decoder",
                "--steps",
                "2",
                "--val-fraction",
                "0.25",
                "--label-id",
                "1",
            ])
            .args(extra),
    );
    let adapter = out.join("last.safetensors");
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
    (adapter, merged)
}

#[test]
fn a_reference_checkpoint_trains_and_merges_in_its_own_layout() {
    let d = scratch("reference-flavour");
    let (adapter, merged) = train_and_merge(&d, &[]);
    let t = read_tensors(&adapter).unwrap();
    for want in [
        "mask_decoder.transformer.layers.0.mlp.layers.0.0.weight",
        "mask_decoder.transformer.layers.1.mlp.fc.bias",
    ] {
        assert!(t.contains_key(want), "{want} missing: {:?}", t.keys());
    }
    assert!(
        !t.keys()
            .any(|k| k.contains("mlp.lin1") || k.contains("mlp.lin2")),
        "SAM's MLP names in a reference-layout adapter: {:?}",
        t.keys()
    );
    let meta = metadata(&adapter);
    assert_eq!(meta["decoder_flavour"], "medsa");
    assert!(meta["config"].contains("\"decoder_flavour\":\"medsa\""));
    // The native size came from the global block's tables (96), not pos_embed's 64x64 grid.
    assert_eq!(meta["model_size"], "96");

    let m = metadata(&merged);
    for (k, v) in [
        ("decoder_flavour", "medsa"),
        ("preset", "medsa"),
        ("model_size", "96"),
        ("label_id", "1"),
        ("num_classes", "1"),
    ] {
        assert_eq!(m.get(k).map(|s| s.as_str()), Some(v), "{k}: {m:?}");
    }
    let mt = read_tensors(&merged).unwrap();
    assert!(mt.contains_key("mask_decoder.transformer.layers.0.mlp.layers.0.0.weight"));
    assert!(mt.contains_key("image_encoder.blocks.1.attn.rel_h"));
    let info = run_ok(bin().arg("info").arg(&merged));
    assert!(
        info.contains("medsa flavour (from the checkpoint's metadata)"),
        "{info}"
    );
}

#[test]
fn a_forced_flavour_is_recorded_and_survives_merge() {
    let d = scratch("reference-forced");
    let (adapter, merged) = train_and_merge(&d, &["--decoder-flavour", "sam"]);
    assert_eq!(metadata(&adapter)["decoder_flavour"], "sam");
    assert_eq!(metadata(&merged)["decoder_flavour"], "sam");
    let info = run_ok(bin().arg("info").arg(&merged));
    assert!(
        info.contains("sam flavour (from the checkpoint's metadata)"),
        "{info}"
    );
    // --resume keeps the flavour the run was started with, and refuses another.
    let resume = |steps: &str, extra: &[&str]| {
        let mut c = train(
            &fixture("reference", "weights"),
            &d.join("data"),
            &d.join("run"),
        );
        c.args([
            "--trainable",
            "adapters+decoder",
            "--steps",
            steps,
            "--val-fraction",
            "0.25",
            "--label-id",
            "1",
            "--resume",
        ])
        .args(extra);
        c
    };
    run_ok(&mut resume("3", &[]));
    assert_eq!(metadata(&adapter)["decoder_flavour"], "sam");
    assert_eq!(metadata(&adapter)["step"], "3");
    let e = run_err(&mut resume("4", &["--decoder-flavour", "medsa"]));
    assert!(
        e.contains("was trained with --decoder-flavour sam, not medsa"),
        "{e}"
    );
}
