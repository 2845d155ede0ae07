//! Training data and adapter checkpoints: dataset discovery and pairing errors, the split, the
//! loader's determinism and prompts, depth chunks, mask downsampling, adapter and optimiser-state
//! files, the base-model hash check, overlays, and new adapters starting at the base model.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medsa::backend::cpu::Cpu;
use medsa::batch::Intensity;
use medsa::data::nifti::{read_nifti, write_f32, write_labels};
use medsa::medsa::depth_branch::DepthMode;
use medsa::pipeline::Preset;
use medsa::sam::{DepthSpec, MaskOutput, Prompts, Sam, SamConfig, Trace};
use medsa::train::checkpoint::{
    apply_adapter, init_adapters, load_adapter, load_state, overlay, overlay_map, read_tensors,
    save_adapter, save_state, state_path, trainable_keys, verify_base, AdapterChoice, AdapterMeta,
    TrainState,
};
use medsa::train::data::{
    discover, downsample_mask, split, Batch, DataKind, DataOptions, Dataset, Loader, LoaderOptions,
    LoaderState,
};
use medsa::train::optim::AdamWState;
use medsa::train::sha256::sha256_file;
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

/// Volumes on the grid of a 7x6x5 fixture: intensities in HU-like units, labels 1 in the
/// slices of `fg` (a 3x3 block), 0 elsewhere.
fn nifti_case(root: &Path, name: &str, fg: &[usize]) {
    let like = read_nifti(&common::fixtures_dir().join("nifti/oblique_float32.nii")).unwrap();
    let [nx, ny, nz] = like.dims;
    let img: Vec<f32> = (0..nx * ny * nz)
        .map(|i| -300.0 + (i * 37 % 600) as f32)
        .collect();
    let lab: Vec<u8> = (0..nx * ny * nz)
        .map(|i| {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            (fg.contains(&z) && (2..5).contains(&x) && (1..4).contains(&y)) as u8
        })
        .collect();
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("labels")).unwrap();
    write_f32(
        &root.join(format!("images/{name}.nii.gz")),
        &like.header,
        &img,
    )
    .unwrap();
    write_labels(&root.join(format!("labels/{name}.nii")), &like.header, &lab).unwrap();
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

#[test]
fn png_folders_pair_by_stem_and_name_unpaired_files() {
    let root = scratch("pairing");
    png_dataset(&root, 3);
    std::fs::write(root.join("images/README.txt"), "ignored").unwrap();
    let (kind, cases) = discover(&root).unwrap();
    assert_eq!(kind, DataKind::Images);
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["case0", "case1", "case2"]);
    assert!(cases[1].image.ends_with("images/case1.jpg"));
    assert!(cases[1].mask.ends_with("masks/case1.png"));

    // An image without a mask names the image and the expected mask path.
    image::GrayImage::new(4, 4)
        .save(root.join("images/lonely.png"))
        .unwrap();
    let e = err_text(discover(&root));
    assert!(
        e.contains("images/lonely.png") && e.contains("masks/lonely.png"),
        "{e}"
    );
    std::fs::remove_file(root.join("images/lonely.png")).unwrap();

    // A mask without an image.
    image::GrayImage::new(4, 4)
        .save(root.join("masks/stray.png"))
        .unwrap();
    let e = err_text(discover(&root));
    assert!(
        e.contains("masks/stray.png") && e.contains("without an image"),
        "{e}"
    );
    std::fs::remove_file(root.join("masks/stray.png")).unwrap();

    // A JPEG label map is refused (lossy labels).
    std::fs::rename(root.join("masks/case2.png"), root.join("masks/case2.jpg")).unwrap();
    image::GrayImage::new(40, 30)
        .save(root.join("masks/case2.jpg"))
        .unwrap();
    let e = err_text(discover(&root));
    assert!(e.contains("case2.jpg") && e.contains("PNG"), "{e}");
    std::fs::remove_file(root.join("masks/case2.jpg")).unwrap();
    label_2d(2, 40, 30)
        .save(root.join("masks/case2.png"))
        .unwrap();

    // Two images of one case.
    image::GrayImage::new(40, 30)
        .save(root.join("images/case0.jpeg"))
        .unwrap();
    let e = err_text(discover(&root));
    assert!(e.contains("two images") && e.contains("case0"), "{e}");
    std::fs::remove_file(root.join("images/case0.jpeg")).unwrap();

    // Sizes that differ name the mask, the image and both sizes.
    image::GrayImage::new(20, 10)
        .save(root.join("masks/case0.png"))
        .unwrap();
    let (kind, cases) = discover(&root).unwrap();
    let e = err_text(Dataset::load(kind, &cases, &opts_2d(32)));
    assert!(
        e.contains("masks/case0.png") && e.contains("20x10") && e.contains("40x30"),
        "{e}"
    );

    // No masks folder at all.
    let bare = scratch("pairing-bare");
    std::fs::create_dir_all(bare.join("images")).unwrap();
    image::GrayImage::new(4, 4)
        .save(bare.join("images/a.png"))
        .unwrap();
    let e = err_text(discover(&bare));
    assert!(e.contains("masks/"), "{e}");
    // Depth chunks need volumes.
    let e = err_text(Dataset::load(
        DataKind::Images,
        &cases,
        &DataOptions {
            depth: Some(2),
            ..opts_2d(32)
        },
    ));
    assert!(e.contains("NIfTI"), "{e}");
}

#[test]
fn manifests_resolve_paths_and_name_bad_fields() {
    let root = scratch("manifest");
    png_dataset(&root.join("data"), 2);
    std::fs::write(
        root.join("train.json"),
        r#"{"cases": [{"image": "data/images/case1.jpg", "mask": "data/masks/case1.png"},
                      {"image": "data/images/case0.png", "label": "data/masks/case0.png"}]}"#,
    )
    .unwrap();
    let (kind, cases) = discover(&root.join("train.json")).unwrap();
    assert_eq!(kind, DataKind::Images);
    assert_eq!(cases.len(), 2);
    assert_eq!(cases[0].name, "case1");
    assert!(cases[1].mask.ends_with("data/masks/case0.png"));

    std::fs::write(
        root.join("bad.json"),
        r#"{"cases": [{"image": "data/images/case1.jpg"}]}"#,
    )
    .unwrap();
    let e = err_text(discover(&root.join("bad.json")));
    assert!(
        e.contains("bad.json") && e.contains("case 0") && e.contains("\"mask\""),
        "{e}"
    );
    std::fs::write(
        root.join("missing.json"),
        r#"[{"image": "data/images/case1.jpg", "mask": "data/masks/nope.png"}]"#,
    )
    .unwrap();
    let e = err_text(discover(&root.join("missing.json")));
    assert!(
        e.contains("nope.png") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn split_is_deterministic_by_case_and_keeps_both_sides() {
    let cases: Vec<u32> = (0..10).collect();
    let (t, v) = split(&cases, 0.2, 7).unwrap();
    assert_eq!((t.len(), v.len()), (8, 2));
    assert_eq!(split(&cases, 0.2, 7).unwrap(), (t.clone(), v.clone()));
    let mut all: Vec<u32> = t.iter().chain(&v).copied().collect();
    all.sort();
    assert_eq!(all, cases);
    assert!(t.windows(2).all(|w| w[0] < w[1]), "input order kept");
    // Other seeds choose other validation cases (at least one of a few).
    assert!((1..6).any(|s| split(&cases, 0.2, s).unwrap().1 != v));
    // At least one case on each side; 0 means no validation.
    assert_eq!(split(&[1, 2], 0.01, 3).unwrap().1.len(), 1);
    assert_eq!(split(&[1, 2], 0.99, 3).unwrap().0.len(), 1);
    assert_eq!(split(&[1], 0.0, 3).unwrap(), (vec![1], vec![]));
    let e = err_text(split(&[1], 0.2, 3));
    assert!(e.contains("at least 2 cases"), "{e}");
    assert!(err_text(split(&cases, 1.0, 3)).contains("[0, 1)"));
    assert!(err_text(split(&cases, f64::NAN, 3)).contains("[0, 1)"));
}

fn same_batches(a: &Batch, b: &Batch) -> bool {
    let t = |p: &Option<Tensor>| p.as_ref().map(|t| t.data().to_vec());
    a.images().unwrap() == b.images().unwrap()
        && a.masks().unwrap() == b.masks().unwrap()
        && t(&a.prompts.point_coords) == t(&b.prompts.point_coords)
        && t(&a.prompts.point_labels) == t(&b.prompts.point_labels)
        && t(&a.prompts.boxes) == t(&b.prompts.boxes)
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

#[test]
fn png_batches_are_deterministic_resumable_and_prompted_inside_masks() {
    let root = scratch("batches");
    png_dataset(&root, 5);
    // A case whose mask has label 2 only: nothing to train on for label 1.
    image::GrayImage::from_fn(40, 30, |_, _| image::Luma([90]))
        .save(root.join("images/empty.png"))
        .unwrap();
    image::GrayImage::from_fn(40, 30, |x, _| image::Luma([if x < 5 { 2 } else { 0 }]))
        .save(root.join("masks/empty.png"))
        .unwrap();
    let (kind, cases) = discover(&root).unwrap();
    let ds = Dataset::load(kind, &cases, &opts_2d(32)).unwrap();
    assert_eq!(ds.num_cases(), 6);
    assert_eq!(ds.len(), 5, "the case without label 1 is left out");
    assert_eq!(ds.skipped_empty(), ["empty"]);
    assert!(ds.cached_bytes() > 0 && ds.cached_bytes() < 6 * (3 * 2 + 1) * 32 * 32);

    let opts = LoaderOptions {
        pos: 2,
        neg: 1,
        box_jitter: Some(2),
        ..LoaderOptions::train(3, 11)
    };
    let mut a = Loader::new(&ds, opts.clone()).unwrap();
    let mut b = Loader::new(&ds, opts.clone()).unwrap();
    let mut other = Loader::new(
        &ds,
        LoaderOptions {
            seed: 12,
            ..opts.clone()
        },
    )
    .unwrap();
    let mut differs = false;
    let mut saved = None;
    for step in 0..6 {
        if step == 2 {
            saved = Some(a.state());
        }
        let x = a.next_batch().unwrap().unwrap();
        let y = b.next_batch().unwrap().unwrap();
        let z = other.next_batch().unwrap().unwrap();
        assert!(same_batches(&x, &y), "step {step}: same seed, same batch");
        differs |= !same_batches(&x, &z);
        assert_eq!(x.len(), 3);
        assert_eq!(x.depth, None);
        assert_eq!(x.images().unwrap().shape(), [3, 3, 32, 32]);
        assert_eq!(x.prompts.point_labels.as_ref().unwrap().shape(), [3, 3]);
        assert_eq!(x.prompts.boxes.as_ref().unwrap().shape(), [3, 4]);
        let img = x.images().unwrap();
        assert!(img.data().iter().all(|v| (0.0..=1.0).contains(v)));
        check_prompts(&x);
        let t = x.targets(8).unwrap();
        assert_eq!(t.shape(), [3, 1, 8, 8]);
        assert!(t.data().iter().all(|&v| v == 0.0 || v == 1.0));
        assert!(t.data().contains(&1.0));
    }
    assert!(differs, "another seed gives other batches");
    // 18 samples from a 5-sample epoch: epoch 3 started.
    assert_eq!(a.state().epoch, 3);
    assert_eq!(a.skipped(), 0);

    // Resuming from a saved state gives the batches that followed it.
    let saved = saved.unwrap();
    let mut r = Loader::new(&ds, opts.clone()).unwrap();
    r.restore(LoaderState::from_words(&saved.to_words()).unwrap())
        .unwrap();
    let mut fresh = Loader::new(&ds, opts).unwrap();
    fresh.next_batch().unwrap();
    fresh.next_batch().unwrap();
    for _ in 0..3 {
        assert!(same_batches(
            &r.next_batch().unwrap().unwrap(),
            &fresh.next_batch().unwrap().unwrap()
        ));
    }

    // Validation: one pass in case order, the last batch short, then None.
    let mut v = Loader::new(&ds, LoaderOptions::eval(2, 5)).unwrap();
    let sizes: Vec<usize> =
        std::iter::from_fn(|| v.next_batch().unwrap().map(|b| b.len())).collect();
    assert_eq!(sizes, [2, 2, 1]);
    let mut v = Loader::new(&ds, LoaderOptions::eval(5, 5)).unwrap();
    let all = v.next_batch().unwrap().unwrap();
    let names: Vec<&str> = all.samples.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["case0", "case1", "case2", "case3", "case4"]);
    check_prompts(&all);

    // All foreground (label_id None) keeps every case.
    let ds_all = Dataset::load(
        kind,
        &cases,
        &DataOptions {
            label_id: None,
            ..opts_2d(32)
        },
    )
    .unwrap();
    assert_eq!(ds_all.len(), 6);
    // A label that no case has is a clear error.
    let e = err_text(Dataset::load(
        kind,
        &cases,
        &DataOptions {
            label_id: Some(9),
            ..opts_2d(32)
        },
    ));
    assert!(e.contains("label 9"), "{e}");
}

#[test]
fn grey_and_colour_images_follow_the_medsa_preset() {
    let root = scratch("preset");
    png_dataset(&root, 2);
    let (kind, cases) = discover(&root).unwrap();
    let ds = Dataset::load(kind, &cases, &opts_2d(16)).unwrap();
    let mut rng = medsa::sam::random::Rng::new(0);
    // Grey case 0: three equal channels; values of pipeline::prepare within f16 rounding.
    let s0 = ds.sample(0, &mut rng).unwrap();
    let want = medsa::pipeline::prepare(
        &medsa::pipeline::load_image(&cases[0].image).unwrap(),
        16,
        Preset::Medsa,
    )
    .unwrap()
    .tensor;
    assert_eq!(s0.image.shape(), [1, 3, 16, 16]);
    for (g, w) in s0.image.data().iter().zip(want.data()) {
        assert!((g - w).abs() <= 2.5e-4, "{g} vs {w}");
    }
    let d = s0.image.data();
    assert_eq!(d[..256], d[256..512]);
    // Colour case 1 keeps distinct channels.
    let s1 = ds.sample(1, &mut rng).unwrap();
    let d = s1.image.data();
    assert_ne!(d[..256], d[256..512]);
    // The mask follows the stretch: label 1 at x 5..17 of 40 and y 5..14 of 30 -> S = 16.
    let m = &s1.mask;
    assert!(m[5 * 16 + 4]);
    assert!(!m[0] && !m[15 * 16 + 15]);
}

#[test]
fn volumes_give_foreground_slices_and_chunks_that_contain_foreground() {
    let root = scratch("volumes");
    nifti_case(&root, "a", &[1, 2]);
    nifti_case(&root, "b", &[4]);
    nifti_case(&root, "c", &[]);
    let (kind, cases) = discover(&root).unwrap();
    assert_eq!(kind, DataKind::Volumes);
    assert_eq!(cases.len(), 3);
    assert!(cases[0].mask.ends_with("labels/a.nii"));
    let base = DataOptions {
        size: 16,
        preset: Preset::Medsa,
        label_id: None,
        intensity: Intensity::parse("ct").unwrap(),
        depth: None,
    };

    // Single slices: one sample per foreground slice.
    let ds = Dataset::load(kind, &cases, &base).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.foreground_slices(0), [1, 2]);
    assert_eq!(ds.foreground_slices(1), [4]);
    assert!(ds.foreground_slices(2).is_empty());
    let mut l = Loader::new(&ds, LoaderOptions::eval(3, 1)).unwrap();
    let b = l.next_batch().unwrap().unwrap();
    let got: Vec<(String, Option<usize>)> = b
        .samples
        .iter()
        .map(|s| (s.name.clone(), s.slice))
        .collect();
    assert_eq!(
        got,
        [
            ("a".to_string(), Some(1)),
            ("a".to_string(), Some(2)),
            ("b".to_string(), Some(4))
        ]
    );
    check_prompts(&b);
    assert!(b
        .images()
        .unwrap()
        .data()
        .iter()
        .all(|v| (0.0..=1.0).contains(v)));
    // The slice's image is the CT-windowed slice through the Med-SA preset.
    let vol = read_nifti(&cases[0].image).unwrap();
    let [nx, ny, _] = vol.dims;
    let mut plane: Vec<f32> = vol.data[nx * ny..2 * nx * ny].to_vec();
    Intensity::parse("ct").unwrap().apply(&mut plane);
    let img = medsa::pipeline::RgbImage {
        height: ny,
        width: nx,
        data: plane.iter().flat_map(|&v| [v * 255.0; 3]).collect(),
    };
    let want = medsa::pipeline::prepare(&img, 16, Preset::Medsa)
        .unwrap()
        .tensor;
    for (g, w) in b.samples[0].image.data().iter().zip(want.data()) {
        assert!((g - w).abs() <= 2.5e-4, "{g} vs {w}");
    }

    // Chunks of 3: every chunk holds foreground; volume b's only foreground slice is the last,
    // so its chunks are always slices 2..5.
    let ds = Dataset::load(
        kind,
        &cases,
        &DataOptions {
            depth: Some(3),
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(ds.len(), 2, "ceil(2/3) + ceil(1/3) chunks per epoch");
    let opts = LoaderOptions {
        pos: 1,
        neg: 1,
        box_jitter: Some(1),
        ..LoaderOptions::train(2, 3)
    };
    let mut l = Loader::new(&ds, opts).unwrap();
    let mut starts_a = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let b = l.next_batch().unwrap().unwrap();
        assert_eq!(b.depth, Some(3));
        assert_eq!(b.len(), 6);
        assert_eq!(b.images().unwrap().shape(), [6, 3, 16, 16]);
        check_prompts(&b);
        let labels = b.prompts.point_labels.as_ref().unwrap();
        for (si, s) in b.samples.iter().enumerate() {
            let first = s.slice.unwrap();
            let fg = ds.foreground_slices(s.case);
            assert!(
                (first..first + 3).any(|k| fg.contains(&k)),
                "{} chunk {first}..{} misses the foreground {fg:?}",
                s.name,
                first + 3
            );
            if s.name == "b" {
                assert_eq!(first, 2);
            } else {
                starts_a.insert(first);
            }
            for p in 0..3 {
                let empty = !s.plane_mask(p).iter().any(|&m| m);
                let l = &labels.data()[(si * 3 + p) * 2..(si * 3 + p) * 2 + 2];
                if empty {
                    assert_eq!(l, [0.0, 0.0], "empty slices get negative clicks");
                } else {
                    assert_eq!(l, [1.0, 0.0]);
                }
            }
        }
        assert_eq!(b.targets(4).unwrap().shape(), [6, 1, 4, 4]);
    }
    // Volume a (foreground 1, 2) can start at 0, 1 or 2.
    assert_eq!(
        starts_a.into_iter().collect::<Vec<_>>(),
        [0, 1, 2],
        "chunk placements"
    );

    // A chunk longer than the volume names the file; mismatched label dims too.
    let e = err_text(Dataset::load(
        kind,
        &cases,
        &DataOptions {
            depth: Some(6),
            ..base.clone()
        },
    ));
    assert!(e.contains("a.nii.gz") && e.contains("5 slices"), "{e}");
    let flat = read_nifti(&common::fixtures_dir().join("nifti/flat2d_uint8.nii")).unwrap();
    write_labels(
        &root.join("labels/b.nii"),
        &flat.header,
        &vec![1u8; flat.data.len()],
    )
    .unwrap();
    let e = err_text(Dataset::load(kind, &cases, &base));
    assert!(e.contains("labels/b.nii") && e.contains("dims"), "{e}");
}

#[test]
fn mask_downsampling_averages_areas_then_thresholds() {
    // A 2x2 block in a 4x4 mask onto 2x2: one full cell.
    let mut m = vec![false; 16];
    for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        m[y * 4 + x] = true;
    }
    assert_eq!(downsample_mask(&m, 4, 2).unwrap(), [1.0, 0.0, 0.0, 0.0]);
    // Half a cell counts (>= 0.5), a quarter does not.
    let mut m = vec![false; 16];
    m[0] = true;
    m[1] = true;
    m[3] = true;
    assert_eq!(downsample_mask(&m, 4, 2).unwrap(), [1.0, 0.0, 0.0, 0.0]);
    // Non-dividing grids weigh partial pixels: 3x3 all-true onto 2x2 is all ones; a lone centre
    // pixel covers a quarter of each cell (0.25 / 2.25) and vanishes.
    assert_eq!(downsample_mask(&[true; 9], 3, 2).unwrap(), [1.0; 4]);
    let mut c = [false; 9];
    c[4] = true;
    assert_eq!(downsample_mask(&c, 3, 2).unwrap(), [0.0; 4]);
    assert!(downsample_mask(&m, 4, 5).is_err());
    assert!(downsample_mask(&m, 3, 2).is_err());
}

fn tiny_plain() -> PathBuf {
    common::fixture("tiny_plain", "weights")
}

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

/// The tiny plain-SAM checkpoint with adapters added, and the added keys.
fn with_adapters(which: AdapterChoice) -> (BTreeMap<String, Tensor>, Vec<String>, SamConfig) {
    let mut t = read_tensors(&tiny_plain()).unwrap();
    let cfg = SamConfig::infer(&WeightStore::from_tensors("tiny_plain", t.clone())).unwrap();
    let added = init_adapters(&mut t, &cfg, which, 5).unwrap();
    (t, added, cfg)
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

/// Low-res masks and IoU of a model on `images` with the fixture's prompts.
fn run(
    model: &Sam<Cpu>,
    images: &Tensor,
    prompts: &Prompts,
    depth: Option<DepthSpec>,
) -> (Tensor, Tensor) {
    let out = model
        .forward(
            &Cpu::new(),
            images,
            prompts,
            MaskOutput::Multimask,
            depth,
            &mut Trace::off(),
        )
        .unwrap();
    (out.low_res_masks, out.iou_predictions)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The top-left `s x s` crop of `[B, 3, H, W]` images.
fn crop(images: &Tensor, s: usize) -> Tensor {
    let sh = images.shape();
    let (b, h, w) = (sh[0], sh[2], sh[3]);
    let mut out = Vec::with_capacity(b * 3 * s * s);
    for i in 0..b * 3 {
        for y in 0..s {
            let row = (i * h + y) * w;
            out.extend_from_slice(&images.data()[row..row + s]);
        }
    }
    Tensor::from_vec(out, &[b, 3, s, s]).unwrap()
}

#[test]
fn new_adapters_start_at_the_base_model() {
    let be = Cpu::new();
    let base = Sam::load(&be, tiny_plain()).unwrap();
    let f = common::open("tiny_plain", "points");
    let images = f.tensor("images").unwrap();
    let prompts = Prompts::read(&f).unwrap();

    // Decoder adapters (HyP-Adpt, MLP, Cross): exactly the base model's masks.
    let (t, added, _) = with_adapters(AdapterChoice::parse("decoder").unwrap());
    assert_eq!(added.len(), 2 * (10 + 4 + 4));
    assert!(added
        .contains(&"mask_decoder.transformer.layers.1.Hyper_Adapter.hyper.2.weight".to_string()));
    assert_eq!(
        t["mask_decoder.transformer.layers.0.Hyper_Adapter.hyper.2.weight"].shape(),
        [64, 32]
    );
    assert_eq!(
        t["mask_decoder.transformer.layers.0.Cross_Adapter.D_fc1.weight"].shape(),
        [8, 32]
    );
    let mut ws = WeightStore::from_tensors("adapted", t);
    let dec = Sam::from_store(&be, &mut ws).unwrap();
    assert!(dec.config.has_decoder_adapters());
    let (m0, i0) = run(&base, &images, &prompts, None);
    let (m1, i1) = run(&dec, &images, &prompts, None);
    assert_eq!(
        max_diff(&m0, &m1),
        0.0,
        "decoder adapters start as identity"
    );
    assert_eq!(max_diff(&i0, &i1), 0.0);

    // Encoder adapters (Space + MLP, D/4 = 8 wide) and depth adapters.
    let (t, added, _) = with_adapters(AdapterChoice::parse("encoder+depth").unwrap());
    assert_eq!(added.len(), 2 * 3 * 4);
    assert_eq!(
        t["image_encoder.blocks.1.Depth_Adapter.D_fc2.weight"].shape(),
        [32, 8]
    );
    let mut ws = WeightStore::from_tensors("adapted", t.clone());
    let enc = Sam::from_store(&be, &mut ws).unwrap();
    assert!(enc.config.has_depth_branch());
    // 48 x 48 input: a 3 x 3 token grid, a multiple of block 0's window of 3, so Med-SA's
    // partition-before-norm1 order sees no padding: the start is exact.
    let small = crop(&images, 48);
    let (m0, _) = run(&base, &small, &prompts, None);
    let (m1, _) = run(&enc, &small, &prompts, None);
    assert!(
        max_diff(&m0, &m1) <= 1e-6 * (1.0 + common::rms(&m0)),
        "{}",
        max_diff(&m0, &m1)
    );
    // With the depth branch over a 2-slice volume: still the base model, slice by slice.
    let two = Tensor::from_vec([small.data(), small.data()].concat(), &[2, 3, 48, 48]).unwrap();
    let pc = prompts.point_coords.as_ref().unwrap();
    let pl = prompts.point_labels.as_ref().unwrap();
    let p2 = Prompts {
        point_coords: Some(
            Tensor::from_vec([pc.data(), pc.data()].concat(), &[2, pc.dim(1), 2]).unwrap(),
        ),
        point_labels: Some(
            Tensor::from_vec([pl.data(), pl.data()].concat(), &[2, pl.dim(1)]).unwrap(),
        ),
        ..Prompts::default()
    };
    let spec = DepthSpec {
        d: 2,
        mode: DepthMode::PerToken,
    };
    let (m2, _) = run(&enc, &two, &p2, Some(spec));
    let (mb, _) = run(&base, &two, &p2, None);
    assert!(
        max_diff(&m2, &mb) <= 1e-6 * (1.0 + common::rms(&mb)),
        "{}",
        max_diff(&m2, &mb)
    );
    // At the fixture's 64 x 64 the 4 x 4 grid pads to 6 x 6 in block 0: the padded tokens are
    // norm1.bias (Med-SA order) instead of 0, so the adapted model differs slightly from the
    // base; measured here and documented in train::checkpoint.
    let (m0, _) = run(&base, &images, &prompts, None);
    let (m1, _) = run(&enc, &images, &prompts, None);
    let diff = max_diff(&m0, &m1);
    assert!(
        diff.is_finite() && diff > 0.0,
        "padding makes Med-SA blocks differ: {diff}"
    );
    eprintln!(
        "64x64, windowed block with padding: max |adapted - base| = {diff:.3e} (rms of logits {:.3e})",
        common::rms(&m0)
    );

    // Same seed, same adapters; a base that already has them keeps its own.
    assert_eq!(
        with_adapters(AdapterChoice::parse("encoder").unwrap()).0,
        with_adapters(AdapterChoice::parse("encoder").unwrap()).0
    );
    let cfg = SamConfig::infer(&WeightStore::from_tensors("m", t.clone())).unwrap();
    let mut again = t.clone();
    assert!(init_adapters(
        &mut again,
        &cfg,
        AdapterChoice::parse("encoder+depth").unwrap(),
        9
    )
    .unwrap()
    .is_empty());
    assert!(AdapterChoice::parse("bogus").is_err());
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
