//! Dataset discovery: PNG folders paired by file stem, manifests with resolved paths, the errors
//! that name unpaired files and bad fields, and the deterministic train / validation split.

use medsa::train::data::{discover, split, DataKind, DataOptions, Dataset};

use super::{err_text, label_2d, opts_2d, png_dataset, scratch};

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
