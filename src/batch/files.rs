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

/// Makes the folder of a case's output, refusing an output that would land outside `out_dir`:
/// an absolute path or one with `..` (as a shared manifest could give), or a path that goes
/// through a symbolic link leading out of the folder. Folders are created one level at a time,
/// so nothing is created outside `out_dir` either.
pub fn prepare_output(out_dir: &Path, output: &Path) -> Result<()> {
    use std::path::Component;
    let outside = |why: &str| {
        Error::Input(format!(
            "output {} {why}: outputs must stay inside the output folder {}",
            output.display(),
            out_dir.display()
        ))
    };
    let rel = output
        .strip_prefix(out_dir)
        .map_err(|_| outside("is not inside the output folder (an absolute path?)"))?;
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside("has a `..`, `.` or root component"));
    }
    let io = |p: &Path, source| Error::Io {
        path: p.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let root = out_dir.canonicalize().map_err(|e| io(out_dir, e))?;
    let mut dir = out_dir.to_path_buf();
    for c in rel.parent().into_iter().flat_map(|p| p.components()) {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = dir.canonicalize().map_err(|e| io(&dir, e))?;
                if !target.starts_with(&root) || !target.is_dir() {
                    return Err(outside(&format!(
                        "goes through the link {} to {}",
                        dir.display(),
                        target.display()
                    )));
                }
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(outside(&format!("needs {} to be a folder", dir.display()))),
            Err(_) => std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?,
        }
    }
    Ok(())
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
