//! Prompts on one 2D image or volume slice: label images read as ids, box and click prompts
//! derived from a label id, bounds checks, and the mapping to model-input `Prompts`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::pipeline::Prepared;
use crate::sam::Prompts;
use crate::tensor::Tensor;

/// Parses a command-line prompt such as `--box "10,20,110,140"`: comma-separated finite numbers,
/// as many as one of `counts`. `what` names the option in the error.
pub fn parse_numbers(s: &str, what: &str, counts: &[usize]) -> Result<Vec<f32>> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Input(format!("{what} \"{s}\": not a list of numbers")))?;
    if !counts.contains(&v.len()) || v.iter().any(|x| !x.is_finite()) {
        let want: Vec<String> = counts.iter().map(|x| x.to_string()).collect();
        return Err(Error::Input(format!(
            "{what} \"{s}\": expected {} finite numbers",
            want.join(" or ")
        )));
    }
    Ok(v)
}

/// A 2D label/ground-truth image as integer ids `[h, w]`: the stored 8- or 16-bit grey values
/// (colour images through their luma), with the height and width.
pub fn load_label_png(path: &Path) -> Result<(Vec<u32>, usize, usize)> {
    let img = crate::pipeline::decode_image(path, "label image")?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Label ids are the stored integers: no rescaling between bit depths.
    let ids: Vec<u32> = match img {
        image::DynamicImage::ImageLuma16(g) => g.into_raw().into_iter().map(u32::from).collect(),
        image::DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(u32::from).collect(),
        other => other
            .to_luma8()
            .into_raw()
            .into_iter()
            .map(u32::from)
            .collect(),
    };
    Ok((ids, h, w))
}

/// Bounding box `(x0, y0, x1, y1)` and centre click of `id` in a `[h, w]` label plane, if present.
pub(super) fn label_prompt(
    plane: &[u32],
    h: usize,
    w: usize,
    id: u32,
) -> Option<([f32; 4], [f32; 2])> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    let (mut sx, mut sy, mut n) = (0f64, 0f64, 0usize);
    for y in 0..h {
        for x in 0..w {
            if plane[y * w + x] == id {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
                sx += x as f64;
                sy += y as f64;
                n += 1;
            }
        }
    }
    if n == 0 {
        return None;
    }
    let (cx, cy) = (sx / n as f64, sy / n as f64);
    // The label pixel nearest the centroid: a click that is surely inside the structure.
    let mut best = (f64::INFINITY, 0usize, 0usize);
    for y in y0..=y1 {
        for x in x0..=x1 {
            if plane[y * w + x] == id {
                let d = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                if d < best.0 {
                    best = (d, x, y);
                }
            }
        }
    }
    Some((
        [x0 as f32, y0 as f32, x1 as f32, y1 as f32],
        [best.1 as f32, best.2 as f32],
    ))
}

/// One object's prompts on one 2D image or slice: points `(x, y, label)` and a box.
pub(super) type Obj2d = (Vec<[f32; 3]>, Option<[f32; 4]>);

/// The prompts of one 2D image (or one volume slice) as a list of per-object `Prompts` in
/// model-input coordinates.
pub(super) fn object_prompts(objects: &[Obj2d], prep: &Prepared) -> Result<Vec<Prompts>> {
    objects
        .iter()
        .map(|(points, bbox)| {
            let mut p = Prompts::default();
            if !points.is_empty() {
                let mut c = Vec::new();
                let mut l = Vec::new();
                for pt in points {
                    let (x, y) = prep.map_xy(pt[0], pt[1]);
                    c.extend([x, y]);
                    l.push(pt[2]);
                }
                p.point_coords = Some(Tensor::from_vec(c, &[1, points.len(), 2])?);
                p.point_labels = Some(Tensor::from_vec(l, &[1, points.len()])?);
            }
            if let Some(b) = bbox {
                let (x0, y0) = prep.map_xy(b[0], b[1]);
                let (x1, y1) = prep.map_xy(b[2], b[3]);
                p.boxes = Some(Tensor::from_vec(vec![x0, y0, x1, y1], &[1, 4])?);
            }
            Ok(p)
        })
        .collect()
}

pub(super) fn check_inside(
    case: &str,
    what: &str,
    x: f32,
    y: f32,
    w: usize,
    h: usize,
) -> Result<()> {
    if !(x >= 0.0 && y >= 0.0 && x <= (w - 1) as f32 && y <= (h - 1) as f32) {
        return Err(Error::Input(format!(
            "{case}: {what} ({x}, {y}) lies outside the {w}x{h} image (pixel indices 0..{} x 0..{})",
            w - 1,
            h - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_prompt_box_and_click_inside() {
        // An L-shaped structure: the centroid is outside it, the click must not be.
        let (h, w) = (6, 6);
        let mut plane = vec![0u32; h * w];
        for y in 1..5 {
            plane[y * w + 1] = 3;
        }
        for x in 1..5 {
            plane[4 * w + x] = 3;
        }
        let (b, c) = label_prompt(&plane, h, w, 3).unwrap();
        assert_eq!(b, [1.0, 1.0, 4.0, 4.0]);
        assert_eq!(plane[c[1] as usize * w + c[0] as usize], 3);
        assert!(label_prompt(&plane, h, w, 7).is_none());
    }
}
