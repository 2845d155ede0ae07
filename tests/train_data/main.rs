//! Training data and adapter checkpoints: dataset discovery and pairing errors, the split, the
//! loader's determinism and prompts, depth chunks, mask downsampling, adapter and optimiser-state
//! files, the base-model hash check, overlays, and new adapters starting at the base model.

mod checkpoints;
#[path = "../common/mod.rs"]
mod common;
mod discovery;
mod loader;
mod new_adapters;
mod volumes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medsa::batch::Intensity;
use medsa::pipeline::Preset;
use medsa::sam::SamConfig;
use medsa::train::checkpoint::{init_adapters, read_tensors, AdapterChoice};
use medsa::train::data::{Batch, DataOptions};
use medsa::weights::WeightStore;
use medsa::Tensor;

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("train-data-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Label map of 2D case `i` (`w x h`): label 1 in a rectangle that moves with `i`, label 2 in
/// the bottom-right corner.
fn label_2d(i: u32, w: u32, h: u32) -> image::GrayImage {
    image::GrayImage::from_fn(w, h, |x, y| {
        let (x0, y0) = (3 + 2 * i, 4 + i);
        if (x0..x0 + 12).contains(&x) && (y0..y0 + 9).contains(&y) {
            image::Luma([1])
        } else if x >= w - 6 && y >= h - 5 {
            image::Luma([2])
        } else {
            image::Luma([0])
        }
    })
}

/// `n` cases of 40x30 pixels: even cases grey PNG, odd cases colour JPEG; PNG label maps.
fn png_dataset(root: &Path, n: u32) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    let (w, h) = (40, 30);
    for i in 0..n {
        if i % 2 == 0 {
            image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 5 + y * 3 + i * 11) as u8]))
                .save(root.join(format!("images/case{i}.png")))
                .unwrap();
        } else {
            image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 8) as u8, (i * 30) as u8])
            })
            .save(root.join(format!("images/case{i}.jpg")))
            .unwrap();
        }
        label_2d(i, w, h)
            .save(root.join(format!("masks/case{i}.png")))
            .unwrap();
    }
}

fn opts_2d(size: usize) -> DataOptions {
    DataOptions {
        size,
        preset: Preset::Medsa,
        label_id: Some(1),
        intensity: Intensity::None,
        depth: None,
    }
}

fn err_text<T>(r: medsa::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Every point is on the right side of its image's mask (label 1 inside, 0 outside, -1 padding);
/// boxes lie within the image.
fn check_prompts(b: &Batch) {
    let s = b.size;
    let n = b.len();
    let coords = b.prompts.point_coords.as_ref().unwrap();
    let labels = b.prompts.point_labels.as_ref().unwrap();
    let np = labels.dim(1);
    assert_eq!(coords.shape(), [n, np, 2]);
    let masks = b.masks().unwrap();
    for i in 0..n {
        let mask = &masks.data()[i * s * s..(i + 1) * s * s];
        for j in 0..np {
            let (x, y) = (
                coords.data()[(i * np + j) * 2],
                coords.data()[(i * np + j) * 2 + 1],
            );
            let l = labels.data()[i * np + j];
            if l == -1.0 {
                continue;
            }
            assert!(x >= 0.0 && y >= 0.0 && x < s as f32 && y < s as f32);
            let inside = mask[y as usize * s + x as usize] == 1.0;
            assert_eq!(inside, l == 1.0, "image {i} point {j} ({x}, {y}) label {l}");
        }
        if let Some(bx) = &b.prompts.boxes {
            let v = &bx.data()[i * 4..i * 4 + 4];
            assert!(v[0] <= v[2] && v[1] <= v[3] && v[2] < s as f32 && v[3] < s as f32);
        }
    }
}

fn tiny_plain() -> PathBuf {
    common::fixture("tiny_plain", "weights")
}

/// The tiny plain-SAM checkpoint with adapters added, and the added keys.
fn with_adapters(which: AdapterChoice) -> (BTreeMap<String, Tensor>, Vec<String>, SamConfig) {
    let mut t = read_tensors(&tiny_plain()).unwrap();
    let cfg = SamConfig::infer(&WeightStore::from_tensors("tiny_plain", t.clone())).unwrap();
    let added = init_adapters(&mut t, &cfg, which, 5).unwrap();
    (t, added, cfg)
}
