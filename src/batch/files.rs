//! Files around a case: finding its label in a folder, sibling output names (`_prob`,
//! `_overview`), creating output folders, and the overview montage of a segmented volume.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pipeline;

use super::cases::stem;

/// The label file of `image` inside folder `dir`: the same base name with any supported
/// extension (`.png`, `.nii.gz`, `.nii`), else the image's own file name.
pub(super) fn find_label(dir: &Path, image: &Path) -> PathBuf {
    let s = stem(image);
    for ext in [".png", ".nii.gz", ".nii"] {
        let p = dir.join(format!("{s}{ext}"));
        if p.exists() {
            return p;
        }
    }
    dir.join(image.file_name().unwrap_or_default())
}

pub(super) fn sibling(out: &Path, suffix: &str, ext: &str) -> PathBuf {
    out.with_file_name(format!("{}{suffix}{ext}", stem(out)))
}

pub(super) fn ensure_parent(p: &Path) -> Result<()> {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => {
            std::fs::create_dir_all(d).map_err(|source| Error::Io {
                path: d.into(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// A montage of up to 6 slices (those given, evenly picked) with the mask overlaid in red.
pub(super) fn write_overview(
    path: &Path,
    data: &[f32],
    labels: &[u8],
    dims: [usize; 3],
    slices: &[usize],
) -> Result<()> {
    let [nx, ny, nz] = dims;
    let pick: Vec<usize> = if slices.is_empty() {
        vec![nz / 2]
    } else {
        let n = slices.len().min(6);
        (0..n)
            .map(|i| slices[i * (slices.len() - 1) / (n - 1).max(1)])
            .collect()
    };
    let (w, h) = (nx * pick.len(), ny);
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for (t, &z) in pick.iter().enumerate() {
        for j in 0..ny {
            for i in 0..nx {
                let idx = z * nx * ny + j * nx + i;
                let g = data[idx].clamp(0.0, 1.0) * 255.0;
                let px = if labels[idx] > 0 {
                    [
                        (0.6 * g + 0.4 * 255.0) as u8,
                        (0.6 * g) as u8,
                        (0.6 * g) as u8,
                    ]
                } else {
                    [g as u8; 3]
                };
                // Row j = 0 at the bottom: radiological slices are displayed with j increasing upwards.
                img.put_pixel((t * nx + i) as u32, (ny - 1 - j) as u32, image::Rgb(px));
            }
        }
    }
    pipeline::write_png_atomic(path, &image::DynamicImage::ImageRgb8(img))
}
