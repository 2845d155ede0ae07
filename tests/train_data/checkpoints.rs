//! Adapter and optimiser-state files: byte-for-byte round trips, the base-model hash check, and
//! overlays that check shapes.

use std::collections::BTreeMap;
use std::path::Path;

use medsa::backend::cpu::Cpu;
use medsa::batch::Intensity;
use medsa::pipeline::Preset;
use medsa::sam::{Sam, SamConfig};
use medsa::train::checkpoint::{
    apply_adapter, load_adapter, load_state, overlay, overlay_map, read_tensors, save_adapter,
    save_state, state_path, trainable_keys, verify_base, AdapterChoice, AdapterMeta, TrainState,
};
use medsa::train::optim::AdamWState;
use medsa::train::sha256::sha256_file;
use medsa::weights::WeightStore;
use medsa::Tensor;

use super::{common, err_text, scratch, tiny_plain, with_adapters};

fn meta_for(cfg: &SamConfig, base: &Path) -> AdapterMeta {
    AdapterMeta {
        base_sha256: sha256_file(base).unwrap(),
        base_file: base.file_name().unwrap().to_string_lossy().into_owned(),
        config: cfg.clone(),
        trainable: "adapters".into(),
        preset: Preset::Medsa,
        model_size: 64,
        intensity: Some(Intensity::Window(-175.0, 250.0)),
        num_classes: 2,
        step: 1234,
        loss: Some(0.123_456_789_012_345_67),
        extra: [("label_id".to_string(), "1".to_string())].into(),
    }
}

#[test]
fn adapter_checkpoints_round_trip_byte_for_byte() {
    let d = scratch("adapter");
    let (t, added, _) = with_adapters(AdapterChoice::parse("encoder+decoder").unwrap());
    let adapters: BTreeMap<String, Tensor> =
        added.iter().map(|k| (k.clone(), t[k].clone())).collect();
    let cfg = SamConfig::infer(&WeightStore::from_tensors("m", t.clone())).unwrap();
    let meta = meta_for(&cfg, &tiny_plain());
    let p = d.join("adapter.safetensors");
    save_adapter(&p, &adapters, &meta).unwrap();
    let (t2, m2) = load_adapter(&p).unwrap();
    assert_eq!(t2, adapters);
    assert_eq!(m2, meta);
    // Same content, same bytes (sorted header, nothing from the clock).
    let first = std::fs::read(&p).unwrap();
    save_adapter(&p, &adapters, &meta).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), first);
    // A 2D adapter has no intensity and may have no loss.
    let m2d = AdapterMeta {
        intensity: None,
        loss: None,
        ..meta.clone()
    };
    save_adapter(&p, &adapters, &m2d).unwrap();
    assert_eq!(load_adapter(&p).unwrap().1, m2d);

    // Reserved keys, and a model checkpoint passed as an adapter.
    let bad = AdapterMeta {
        extra: [("step".to_string(), "1".to_string())].into(),
        ..meta.clone()
    };
    assert!(err_text(save_adapter(&p, &adapters, &bad)).contains("reserved"));
    let e = err_text(load_adapter(&tiny_plain()));
    assert!(
        e.contains("weights.safetensors") && e.contains("`format`"),
        "{e}"
    );
    // A damaged field is named.
    let mut tweak = meta.clone();
    tweak.base_sha256 = "xyz".into();
    assert!(err_text(save_adapter(&p, &adapters, &tweak)).contains("base_sha256"));

    // Trainable sets.
    let keys: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
    let ad = trainable_keys(keys.iter().copied(), "adapters").unwrap();
    assert_eq!(ad.len(), added.len());
    let dec = trainable_keys(keys.iter().copied(), "adapters+decoder").unwrap();
    assert!(
        dec.len() > ad.len()
            && dec
                .iter()
                .all(|k| k.contains("_Adapter.") || k.starts_with("mask_decoder."))
    );
    assert!(trainable_keys(keys.iter().copied(), "everything").is_err());
}

#[test]
fn the_base_model_hash_is_checked_and_overlays_check_shapes() {
    let d = scratch("hash");
    let (t, added, _) = with_adapters(AdapterChoice::parse("decoder").unwrap());
    let adapters: BTreeMap<String, Tensor> =
        added.iter().map(|k| (k.clone(), t[k].clone())).collect();
    let cfg = SamConfig::infer(&WeightStore::from_tensors("m", t.clone())).unwrap();
    let p = d.join("adapter.safetensors");
    save_adapter(&p, &adapters, &meta_for(&cfg, &tiny_plain())).unwrap();

    // The right base: the store loads as the adapted model.
    let (mut ws, meta) = apply_adapter(&tiny_plain(), &p, false).unwrap();
    assert_eq!(meta.step, 1234);
    let be = Cpu::new();
    let model = Sam::from_store(&be, &mut ws).unwrap();
    assert!(model.config.has_decoder_adapters());

    // Another base: both files and both hashes are named; allowed explicitly, it passes.
    let other = common::fixture("tiny", "weights");
    let e = err_text(apply_adapter(&other, &p, false));
    let (h1, h2) = (
        sha256_file(&tiny_plain()).unwrap(),
        sha256_file(&other).unwrap(),
    );
    assert!(
        e.contains(&h1)
            && e.contains(&h2)
            && e.contains("adapter.safetensors")
            && e.contains("tiny/weights.safetensors")
            && e.contains("weights.safetensors"),
        "{e}"
    );
    assert!(verify_base(&other, &p, &meta, true).is_ok());

    // Shapes: a replaced tensor must keep its shape; the error names key, shapes and source.
    let mut ws = WeightStore::open(tiny_plain()).unwrap();
    let wrong: BTreeMap<String, Tensor> = [(
        "image_encoder.pos_embed".to_string(),
        Tensor::zeros(&[1, 2, 2, 32]),
    )]
    .into();
    let e = err_text(overlay(
        &mut ws,
        Path::new("bad_adapter.safetensors"),
        wrong.clone(),
    ));
    assert!(
        e.contains("image_encoder.pos_embed")
            && e.contains("[1, 2, 2, 32]")
            && e.contains("[1, 4, 4, 32]")
            && e.contains("bad_adapter.safetensors"),
        "{e}"
    );
    let mut base = read_tensors(&tiny_plain()).unwrap();
    let e = err_text(overlay_map(
        &mut base,
        Path::new("bad_adapter.safetensors"),
        &wrong,
    ));
    assert!(
        e.contains("image_encoder.pos_embed") && e.contains("[1, 2, 2, 32]"),
        "{e}"
    );
    // A same-shaped replacement is taken.
    let ok: BTreeMap<String, Tensor> = [(
        "image_encoder.pos_embed".to_string(),
        Tensor::zeros(&[1, 4, 4, 32]),
    )]
    .into();
    overlay(&mut ws, Path::new("ok"), ok).unwrap();
    assert!(ws
        .take("image_encoder.pos_embed", &[1, 4, 4, 32])
        .unwrap()
        .data()
        .iter()
        .all(|&v| v == 0.0));
}

#[test]
fn optimiser_state_round_trips() {
    let d = scratch("state");
    let adapter = d.join("run.safetensors");
    let p = state_path(&adapter);
    assert_eq!(p, d.join("run.state.safetensors"));
    let mut optim = BTreeMap::new();
    optim.insert(
        "image_encoder.blocks.0.Space_Adapter.D_fc1.weight".to_string(),
        AdamWState {
            m: vec![0.5, -1.25, 3.0],
            v: vec![0.25, 1e-12, 9.0],
            step: 17,
        },
    );
    optim.insert("fresh".to_string(), AdamWState::default());
    let st = TrainState {
        step: 17,
        rng: vec![3, u64::MAX, 0],
        optim,
        extra: serde_json::json!({"lr": 1e-4, "best_dice": 0.75}),
    };
    save_state(&p, &st).unwrap();
    assert_eq!(load_state(&p).unwrap(), st);
    let bytes = std::fs::read(&p).unwrap();
    save_state(&p, &st).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), bytes, "deterministic bytes");
    let e = err_text(load_state(&tiny_plain()));
    assert!(
        e.contains("weights.safetensors") && e.contains("`format`"),
        "{e}"
    );
    let bad = TrainState {
        optim: [(
            "x".to_string(),
            AdamWState {
                m: vec![1.0],
                v: vec![],
                step: 1,
            },
        )]
        .into(),
        ..st
    };
    assert!(err_text(save_state(&p, &bad)).contains("`x`"));
}
