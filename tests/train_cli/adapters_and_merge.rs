//! Adapters trained on a plain model: adapter files that carry only adapters and the base's hash,
//! `merge`, and `segment` / `forward --adapter` predicting what base + adapter predict.

use std::collections::HashMap;
use std::path::Path;

use medsa::train::checkpoint::read_tensors;
use medsa::train::sha256::sha256_file;
use medsa::weights::save_safetensors;
use medsa::Tensor;

use super::{bin, disc, init_tiny, max_abs_diff, metadata, png_dataset, run_ok, scratch, train};

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
