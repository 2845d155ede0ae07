//! The 2D loader: deterministic, resumable batches with prompts inside the masks, grey and colour
//! images under the Med-SA preset, and mask downsampling.

use medsa::pipeline::Preset;
use medsa::train::data::{
    discover, downsample_mask, Batch, DataOptions, Dataset, Loader, LoaderOptions, LoaderState,
};
use medsa::Tensor;

use super::{check_prompts, err_text, opts_2d, png_dataset, scratch};

fn same_batches(a: &Batch, b: &Batch) -> bool {
    let t = |p: &Option<Tensor>| p.as_ref().map(|t| t.data().to_vec());
    a.images().unwrap() == b.images().unwrap()
        && a.masks().unwrap() == b.masks().unwrap()
        && t(&a.prompts.point_coords) == t(&b.prompts.point_coords)
        && t(&a.prompts.point_labels) == t(&b.prompts.point_labels)
        && t(&a.prompts.boxes) == t(&b.prompts.boxes)
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
