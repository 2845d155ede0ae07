//! NIfTI volume datasets: foreground slices for 2D training and depth chunks that contain
//! foreground.

use std::path::Path;

use medsa::batch::Intensity;
use medsa::data::nifti::{read_nifti, write_f32, write_labels};
use medsa::pipeline::Preset;
use medsa::train::data::{discover, DataKind, DataOptions, Dataset, Loader, LoaderOptions};

use super::{check_prompts, common, err_text, scratch};

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
