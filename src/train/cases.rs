//! Finding a training dataset's cases (the layouts of [`super::data`]: `images/` + `masks/`
//! folders, `images/` + `labels/` NIfTI folders, or a JSON manifest) and splitting them into
//! training and validation cases.

use std::path::{Path, PathBuf};

use super::data::{derive, shuffle};
use crate::batch;
use crate::error::{Error, Result};
use crate::sam::random::Rng;

/// Stream id of the train/validation split's generator (see [`super::data`], Determinism).
const SPLIT_STREAM: u64 = 0x5350_4c49_5400_0000;

/// What a dataset holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// 2D images (PNG/JPEG) with PNG label maps.
    Images,
    /// NIfTI volumes with NIfTI label volumes.
    Volumes,
}

/// One training case: an image or volume and its label map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseFiles {
    /// The image's stem (used in reports).
    pub name: String,
    /// The image or volume.
    pub image: PathBuf,
    /// The label map.
    pub mask: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lower_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_image(p: &Path) -> bool {
    let n = lower_name(p);
    n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg")
}

fn is_png(p: &Path) -> bool {
    lower_name(p).ends_with(".png")
}

/// Regular, non-hidden files of a folder, sorted.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !lower_name(p).starts_with('.'))
        .collect();
    files.sort();
    Ok(files)
}

/// Lists the cases of a dataset folder (`images/` + `masks/` or `labels/`) or a JSON manifest,
/// and says whether they are 2D images or volumes. See the module documentation for the rules.
pub fn discover(root: &Path) -> Result<(DataKind, Vec<CaseFiles>)> {
    let meta = std::fs::metadata(root).map_err(io_err(root))?;
    if meta.is_file() {
        if lower_name(root).ends_with(".json") {
            return read_manifest(root);
        }
        return Err(Error::Input(format!(
            "{}: expected a dataset folder (images/ with masks/ or labels/) or a .json manifest",
            root.display()
        )));
    }
    let images_dir = root.join("images");
    if !images_dir.is_dir() {
        return Err(Error::Input(format!(
            "{}: no images/ folder: expected images/ with masks/ (2D) or labels/ (NIfTI volumes), or a .json manifest",
            root.display()
        )));
    }
    let files = list_files(&images_dir)?;
    let pngs: Vec<&PathBuf> = files.iter().filter(|p| is_image(p)).collect();
    let vols: Vec<&PathBuf> = files.iter().filter(|p| batch::is_nifti(p)).collect();
    let kind = match (pngs.first(), vols.first()) {
        (Some(a), Some(b)) => {
            return Err(Error::Input(format!(
                "{}: mixes 2D images ({}) and NIfTI volumes ({}); use one kind per dataset",
                images_dir.display(),
                a.display(),
                b.display()
            )))
        }
        (Some(_), None) => DataKind::Images,
        (None, Some(_)) => DataKind::Volumes,
        (None, None) => {
            return Err(Error::Input(format!(
                "{}: no PNG, JPEG or NIfTI (.nii, .nii.gz) files",
                images_dir.display()
            )))
        }
    };
    let images = if kind == DataKind::Images { pngs } else { vols };
    let folders: [&str; 2] = match kind {
        DataKind::Images => ["masks", "labels"],
        DataKind::Volumes => ["labels", "masks"],
    };
    let mask_dir = folders
        .iter()
        .map(|f| root.join(f))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            Error::Input(format!(
                "{}: no {}/ folder with the label maps of images/",
                root.display(),
                folders[0]
            ))
        })?;
    let mask_ok = |p: &Path| match kind {
        DataKind::Images => is_png(p),
        DataKind::Volumes => batch::is_nifti(p),
    };
    let mut masks: std::collections::BTreeMap<String, PathBuf> = Default::default();
    let mut wrong_type: std::collections::BTreeMap<String, PathBuf> = Default::default();
    for m in list_files(&mask_dir)? {
        if !(is_image(&m) || batch::is_nifti(&m)) {
            continue;
        }
        let s = batch::stem(&m);
        if !mask_ok(&m) {
            wrong_type.insert(s, m);
            continue;
        }
        if let Some(prev) = masks.insert(s.clone(), m.clone()) {
            return Err(Error::Input(format!(
                "{} and {}: two label maps for case \"{s}\"",
                prev.display(),
                m.display()
            )));
        }
    }
    let want = match kind {
        DataKind::Images => "PNG (a lossless label map)",
        DataKind::Volumes => "NIfTI (.nii or .nii.gz)",
    };
    let mut cases: Vec<CaseFiles> = Vec::with_capacity(images.len());
    for img in images {
        let name = batch::stem(img);
        if let Some(prev) = cases.iter().find(|c| c.name == name) {
            return Err(Error::Input(format!(
                "{} and {}: two images for case \"{name}\"",
                prev.image.display(),
                img.display()
            )));
        }
        let mask = match masks.remove(&name) {
            Some(m) => m,
            None => {
                if let Some(w) = wrong_type.get(&name) {
                    return Err(Error::Input(format!(
                        "{}: label map of {} must be {want}",
                        w.display(),
                        img.display()
                    )));
                }
                let ext = if kind == DataKind::Images {
                    ".png"
                } else {
                    ".nii.gz (or .nii)"
                };
                return Err(Error::Input(format!(
                    "{}: no label map: expected {}{ext}",
                    img.display(),
                    mask_dir.join(&name).display()
                )));
            }
        };
        cases.push(CaseFiles {
            name,
            image: img.clone(),
            mask,
        });
    }
    if let Some((_, m)) = masks.into_iter().next() {
        return Err(Error::Input(format!(
            "{}: label map without an image of the same name in {}",
            m.display(),
            images_dir.display()
        )));
    }
    Ok((kind, cases))
}

/// Reads a manifest `{"cases": [{"image": .., "mask": ..}]}` (or a bare list of cases).
fn read_manifest(path: &Path) -> Result<(DataKind, Vec<CaseFiles>)> {
    let err = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let list = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => o
            .get("cases")
            .and_then(|c| c.as_array())
            .ok_or_else(|| err("expected {\"cases\": [{\"image\": .., \"mask\": ..}]}".into()))?,
        _ => {
            return Err(err(
                "expected {\"cases\": [{\"image\": .., \"mask\": ..}]}".into()
            ))
        }
    };
    if list.is_empty() {
        return Err(err("\"cases\" is empty".into()));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut kind = None;
    let mut cases = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let field = |k: &str| c.get(k).and_then(|x| x.as_str());
        let image =
            field("image").ok_or_else(|| err(format!("case {i}: missing \"image\" (a path)")))?;
        let mask = field("mask")
            .or_else(|| field("label"))
            .ok_or_else(|| err(format!("case {i}: missing \"mask\" (a path)")))?;
        let (image, mask) = (base.join(image), base.join(mask));
        let k = if batch::is_nifti(&image) {
            DataKind::Volumes
        } else if is_image(&image) {
            DataKind::Images
        } else {
            return Err(err(format!(
                "case {i}: image {} is not PNG, JPEG or NIfTI",
                image.display()
            )));
        };
        match (k, is_png(&mask), batch::is_nifti(&mask)) {
            (DataKind::Images, true, _) | (DataKind::Volumes, _, true) => {}
            (DataKind::Images, ..) => {
                return Err(err(format!(
                    "case {i}: mask {} must be a PNG label map",
                    mask.display()
                )))
            }
            (DataKind::Volumes, ..) => {
                return Err(err(format!(
                    "case {i}: mask {} must be a NIfTI label volume",
                    mask.display()
                )))
            }
        }
        if *kind.get_or_insert(k) != k {
            return Err(err(format!(
                "case {i}: {} mixes 2D images and NIfTI volumes in one dataset",
                image.display()
            )));
        }
        for (what, p) in [("image", &image), ("mask", &mask)] {
            if !p.is_file() {
                return Err(err(format!(
                    "case {i}: {what} {} does not exist",
                    p.display()
                )));
            }
        }
        cases.push(CaseFiles {
            name: batch::stem(&image),
            image,
            mask,
        });
    }
    Ok((kind.unwrap_or(DataKind::Images), cases))
}

/// Splits cases into `(train, validation)` deterministically: `round(n * val_fraction)`
/// validation cases (at least one, leaving at least one for training), chosen by a shuffle seeded
/// with `seed`; both parts keep the input order. The split is by case, never by slice, so no
/// volume contributes to both. A fraction of 0 keeps every case for training (no validation);
/// any other fraction needs at least 2 cases.
pub fn split<T: Clone>(cases: &[T], val_fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Input(format!(
            "validation fraction {val_fraction}: expected a number in [0, 1)"
        )));
    }
    let n = cases.len();
    if val_fraction == 0.0 {
        return Ok((cases.to_vec(), Vec::new()));
    }
    if n < 2 {
        return Err(Error::Input(format!(
            "a validation split needs at least 2 cases, found {n}; use a validation fraction of 0 to train on every case"
        )));
    }
    let n_val = ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    shuffle(&mut idx, &mut Rng::new(derive(seed, SPLIT_STREAM, 0)));
    let mut is_val = vec![false; n];
    for &i in &idx[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (c, v) in cases.iter().zip(is_val) {
        if v {
            val.push(c.clone());
        } else {
            train.push(c.clone());
        }
    }
    Ok((train, val))
}
