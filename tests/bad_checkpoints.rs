//! Broken checkpoints fail with errors that name the file, the key and both shapes or dtypes,
//! never with a panic.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use medsa::backend::cpu::Cpu;
use medsa::sam::Sam;
use medsa::weights::{save_safetensors, SafetensorsFile};
use medsa::{Error, Tensor};

fn tiny() -> Vec<(String, Tensor)> {
    let f = common::open("tiny", "weights");
    f.keys()
        .map(|k| (k.to_string(), f.tensor(k).unwrap()))
        .collect()
}

fn write(name: &str, t: &[(String, Tensor)]) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "medsa-bad-{name}-{}.safetensors",
        std::process::id()
    ));
    save_safetensors(&p, t, &HashMap::new()).unwrap();
    p
}

fn load_err(p: &PathBuf) -> Error {
    match Sam::load(&Cpu::new(), p) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_key_is_named() {
    let t: Vec<_> = tiny()
        .into_iter()
        .filter(|(k, _)| k != "image_encoder.blocks.1.mlp.lin2.bias")
        .collect();
    let p = write("missing", &t);
    let e = load_err(&p).to_string();
    assert!(
        e.contains("image_encoder.blocks.1.mlp.lin2.bias") && e.contains("missing"),
        "{e}"
    );
    assert!(e.contains(&p.display().to_string()), "{e}");
    // The model knows the bias's shape: the error says it (and never an empty `[]`).
    assert!(e.contains("(expected shape [32])"), "{e}");
    // A key looked up by shape inference has no known shape: none is claimed.
    let t: Vec<_> = tiny()
        .into_iter()
        .filter(|(k, _)| k != "prompt_encoder.mask_downscaling.3.weight")
        .collect();
    let e = load_err(&write("missing-shape", &t)).to_string();
    assert!(
        e.contains("missing tensor `prompt_encoder.mask_downscaling.3.weight`")
            && !e.contains("expected shape"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let mut t = tiny();
    for (k, v) in t.iter_mut() {
        if k == "mask_decoder.transformer.layers.0.norm2.weight" {
            *v = Tensor::zeros(&[31]);
        }
    }
    let e = load_err(&write("shape", &t)).to_string();
    assert!(
        e.contains("mask_decoder.transformer.layers.0.norm2.weight"),
        "{e}"
    );
    assert!(e.contains("[31]") && e.contains("[32]"), "{e}");
}

#[test]
fn unexpected_key_is_reported() {
    let mut t = tiny();
    t.push((
        "image_encoder.blocks.0.Mystery_Adapter.weight".into(),
        Tensor::zeros(&[3]),
    ));
    let e = load_err(&write("extra", &t)).to_string();
    assert!(e.contains("Mystery_Adapter"), "{e}");
}

#[test]
fn integer_dtype_is_rejected_with_key() {
    // Write a file by hand with an I32 tensor in place of a float one.
    let t = tiny();
    let key = "prompt_encoder.no_mask_embed.weight";
    let mut views = Vec::new();
    let ints: Vec<u8> = vec![0u8; 32 * 4];
    for (k, v) in &t {
        let view = if k == key {
            safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![1, 32], &ints)
                .unwrap()
        } else {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                v.shape().to_vec(),
                bytemuck::cast_slice(v.data()),
            )
            .unwrap()
        };
        views.push((k.clone(), view));
    }
    let p = std::env::temp_dir().join(format!(
        "medsa-bad-dtype-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&p, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let e = load_err(&p).to_string();
    assert!(e.contains(key) && e.contains("I32"), "{e}");
}

#[test]
fn truncated_and_garbage_files_are_errors() {
    let p = std::env::temp_dir().join(format!(
        "medsa-bad-garbage-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&p, b"definitely not a safetensors file").unwrap();
    let e = SafetensorsFile::open(&p)
        .err()
        .expect("garbage parsed")
        .to_string();
    assert!(e.contains("not a valid safetensors file"), "{e}");
    let good = std::fs::read(common::fixture("tiny", "weights")).unwrap();
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    assert!(SafetensorsFile::open(&p).is_err());
}

#[test]
fn f32_f16_bf16_checkpoints_all_load() {
    let be = Cpu::new();
    for case in ["tiny", "sam_geom", "volume"] {
        Sam::load(&be, common::fixture(case, "weights")).unwrap_or_else(|e| panic!("{case}: {e}"));
    }
}

fn tinyvit() -> Vec<(String, Tensor)> {
    let f = common::open("tinyvit_lite", "weights");
    f.keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .map(|k| (k.to_string(), f.tensor(k).unwrap()))
        .collect()
}

#[test]
fn broken_tinyvit_checkpoints_name_the_key_and_the_expected_shape() {
    // A bias table whose offset count is not a square window.
    let key = "image_encoder.layers.1.blocks.0.attn.attention_biases";
    let t: Vec<_> = tinyvit()
        .into_iter()
        .map(|(k, v)| {
            if k == key {
                (k, Tensor::zeros(&[v.shape()[0], 24]))
            } else {
                (k, v)
            }
        })
        .collect();
    let e = load_err(&write("tinyvit-bias", &t)).to_string();
    assert!(
        e.contains(key) && e.contains("expected [heads, w*w]"),
        "{e}"
    );
    // A BatchNorm statistic missing from a Conv2d_BN.
    let key = "image_encoder.layers.2.blocks.1.local_conv.bn.running_var";
    let t: Vec<_> = tinyvit().into_iter().filter(|(k, _)| k != key).collect();
    let e = load_err(&write("tinyvit-bn", &t)).to_string();
    assert!(e.contains(key) && e.contains("missing"), "{e}");
    // A stem kernel that is neither LiteMedSAM's 1x1 nor MobileSAM's 3x3.
    let key = "image_encoder.patch_embed.seq.0.c.weight";
    let t: Vec<_> = tinyvit()
        .into_iter()
        .map(|(k, v)| {
            if k == key {
                let s = v.shape().to_vec();
                (k, Tensor::zeros(&[s[0], 3, 5, 5]))
            } else {
                (k, v)
            }
        })
        .collect();
    let e = load_err(&write("tinyvit-stem", &t)).to_string();
    assert!(e.contains(key) && e.contains("LiteMedSAM"), "{e}");
}
