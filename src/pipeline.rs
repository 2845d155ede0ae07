//! Image pre- and post-processing around the model (SPEC section 5): what `segment` runs.
//!
//! SAM preset: resize the longest side to the model size (`int(x * scale + 0.5)`), antialiased
//! bilinear (a triangle filter widened when shrinking, as PIL's resize that SAM uses), normalise
//! with SAM's pixel mean and std on 0..255, pad bottom/right to the model size with zeros.
//! Med-SA preset: resize to model size x model size (aspect not kept), scale to [0, 1], no
//! mean/std. Masks come back to the original grid through `sam::model::postprocess_masks`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// SAM's pixel mean on 0..255 (RGB).
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// SAM's pixel std on 0..255 (RGB).
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// An RGB image with f32 values on the 0..255 scale, `[H, W, 3]` row-major.
#[derive(Clone, Debug)]
pub struct RgbImage {
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `height * width * 3` values.
    pub data: Vec<f32>,
}

/// Preprocessing presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preset {
    /// SAM: keep aspect, normalise, pad.
    #[default]
    Sam,
    /// Med-SA training preset: stretch to square, [0, 1], no normalisation.
    Medsa,
    /// LiteMedSAM's (SPEC section 8): longest side to the model size with OpenCV's INTER_AREA
    /// resampling, min-max to [0, 1] on the resized image, pad bottom/right, no mean/std;
    /// coordinates scale by `size / max(H, W)`.
    LiteMedsam,
}

/// Decodes a PNG or JPEG within the process default pixel budget
/// ([`crate::limits::current`]): the size in the file's header is checked before any pixel is
/// decoded, and the decoder may allocate no more than the budget's worth of 16-bit RGBA.
/// `what` says what the file is in errors ("image", "label image").
pub fn decode_image(path: &Path, what: &str) -> Result<image::DynamicImage> {
    let limits = crate::limits::current();
    let open = || -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
        image::ImageReader::open(path)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .with_guessed_format()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
    };
    let (w, h) = open()?
        .into_dimensions()
        .map_err(|e| Error::Input(format!("{}: cannot decode {what}: {e}", path.display())))?;
    limits.check_pixels(path, w as u64, h as u64)?;
    // A header can claim any size, and the JPEG decoder fills missing data with zeros: a
    // 300-byte file claiming 16 M pixels decodes "fine". No real PNG or JPEG holds more than a
    // few thousand pixels per byte (deflate's 1032:1 on 1-bit rows; a JPEG block needs a few
    // bits, or a progressive EOB run), so more than 10,000 is a truncated file or a bomb.
    const MAX_PIXELS_PER_BYTE: u64 = 10_000;
    let bytes = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let pixels = w as u64 * h as u64;
    if pixels > bytes.saturating_mul(MAX_PIXELS_PER_BYTE) {
        return Err(Error::Input(format!(
            "{}: {what} claims {w}x{h} pixels in {bytes} bytes: the file is truncated or corrupt",
            path.display()
        )));
    }
    let mut reader = open()?;
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(512 << 20));
    reader.limits(l);
    reader
        .decode()
        .map_err(|e| Error::Input(format!("{}: cannot decode {what}: {e}", path.display())))
}

/// Reads a PNG or JPEG (8- or 16-bit, grey or colour) as RGB on the 0..255 scale, within the
/// pixel budget ([`decode_image`]).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let img = decode_image(path, "image")?;
    let rgb = img.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Input(format!(
            "{}: image has no pixels",
            path.display()
        )));
    }
    Ok(RgbImage {
        height: h,
        width: w,
        data: rgb.into_raw().into_iter().map(|v| v * 255.0).collect(),
    })
}

/// SAM's target size for resizing the longest side to `long`.
pub fn preprocess_shape(h: usize, w: usize, long: usize) -> (usize, usize) {
    let scale = long as f64 / h.max(w) as f64;
    (
        (h as f64 * scale + 0.5) as usize,
        (w as f64 * scale + 0.5) as usize,
    )
}

/// Antialiased linear resampling weights: for each output index, `(first input index, weights)`.
fn filter_weights(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f64 / out as f64;
    let support = scale.max(1.0);
    (0..out)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(inp);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let s: f64 = w.iter().sum();
            if s > 0.0 {
                w.iter_mut().for_each(|x| *x /= s);
            }
            (lo, w.into_iter().map(|x| x as f32).collect())
        })
        .collect()
}

/// Resizes an RGB image (separable antialiased bilinear).
pub fn resize(img: &RgbImage, h: usize, w: usize) -> RgbImage {
    resize_with(
        img,
        h,
        w,
        filter_weights(img.width, w),
        filter_weights(img.height, h),
    )
}

/// Separable resampling with per-axis weight tables (`(first input index, weights)` per output).
fn resize_with(
    img: &RgbImage,
    h: usize,
    w: usize,
    fx: Vec<(usize, Vec<f32>)>,
    fy: Vec<(usize, Vec<f32>)>,
) -> RgbImage {
    let mut tmp = vec![0f32; img.height * w * 3];
    for y in 0..img.height {
        for (x, (lo, ws)) in fx.iter().enumerate() {
            for c in 0..3 {
                let mut s = 0f32;
                for (k, wt) in ws.iter().enumerate() {
                    s += wt * img.data[(y * img.width + lo + k) * 3 + c];
                }
                tmp[(y * w + x) * 3 + c] = s;
            }
        }
    }
    let mut out = vec![0f32; h * w * 3];
    for (y, (lo, ws)) in fy.iter().enumerate() {
        for x in 0..w {
            for c in 0..3 {
                let mut s = 0f32;
                for (k, wt) in ws.iter().enumerate() {
                    s += wt * tmp[((lo + k) * w + x) * 3 + c];
                }
                out[(y * w + x) * 3 + c] = s;
            }
        }
    }
    RgbImage {
        height: h,
        width: w,
        data: out,
    }
}

/// A preprocessed image and how to map coordinates onto it.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// `[1, 3, S, S]` model input.
    pub tensor: Tensor,
    /// The resized image size before padding `(h, w)`.
    pub input_size: (usize, usize),
    /// The original size `(h, w)`.
    pub original_size: (usize, usize),
    /// One scale for both axes (`size / max(H, W)`, LiteMedSAM's box scaling) instead of the
    /// per-axis ratio of the resized to the original size.
    pub uniform_scale: Option<f32>,
}

impl Prepared {
    /// Maps original-pixel `(x, y)` to model-input pixels.
    pub fn map_xy(&self, x: f32, y: f32) -> (f32, f32) {
        if let Some(s) = self.uniform_scale {
            return (x * s, y * s);
        }
        (
            x * self.input_size.1 as f32 / self.original_size.1 as f32,
            y * self.input_size.0 as f32 / self.original_size.0 as f32,
        )
    }
}

/// OpenCV's INTER_AREA resampling weights along one axis: for each output index, `(first input
/// index, weights)`. Shrinking averages the input over each output pixel's footprint
/// `[i * scale, (i + 1) * scale)` (fractional overlaps at its ends); enlarging interpolates
/// linearly between neighbours with OpenCV's area-mode coefficient
/// `f = (i + 1) - (floor(i * scale) + 1) / scale`, clipped to `[0, 1)`, so pixels are replicated
/// inside and blended only at their borders.
fn area_weights(inp: usize, out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = inp as f64 / out as f64;
    if scale >= 1.0 {
        return (0..out)
            .map(|i| {
                let (a, b) = (i as f64 * scale, ((i + 1) as f64 * scale).min(inp as f64));
                let lo = a.floor() as usize;
                let hi = (b.ceil() as usize).min(inp);
                let w = (lo..hi)
                    .map(|j| {
                        let ov = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
                        (ov / scale) as f32
                    })
                    .collect();
                (lo, w)
            })
            .collect();
    }
    let inv = 1.0 / scale;
    (0..out)
        .map(|i| {
            let sx = (i as f64 * scale).floor() as isize;
            let mut f = (i + 1) as f64 - (sx + 1) as f64 * inv;
            f = if f <= 0.0 { 0.0 } else { f - f.floor() };
            let sx = sx.clamp(0, inp as isize - 1) as usize;
            if sx + 1 >= inp {
                (sx, vec![1.0])
            } else {
                (sx, vec![(1.0 - f) as f32, f as f32])
            }
        })
        .collect()
}

/// Resizes an RGB image with OpenCV's INTER_AREA (see [`area_weights`]), separably.
pub fn resize_area(img: &RgbImage, h: usize, w: usize) -> RgbImage {
    resize_with(
        img,
        h,
        w,
        area_weights(img.width, w),
        area_weights(img.height, h),
    )
}

/// Applies a preset for a square model input of `size` pixels.
pub fn prepare(img: &RgbImage, size: usize, preset: Preset) -> Result<Prepared> {
    let (h, w) = match preset {
        Preset::Sam | Preset::LiteMedsam => preprocess_shape(img.height, img.width, size),
        Preset::Medsa => (size, size),
    };
    if h == 0 || w == 0 {
        return Err(Error::Input(format!(
            "image of {}x{} pixels is too thin to resize to {size}",
            img.width, img.height
        )));
    }
    let r = match preset {
        Preset::LiteMedsam => resize_area(img, h, w),
        _ => resize(img, h, w),
    };
    // LiteMedSAM's min-max over the resized image (all channels), range clipped at 1e-8.
    let (lo, hi) = r
        .data
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let range = (hi - lo).max(1e-8);
    let mut t = vec![0f32; 3 * size * size];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = r.data[(y * w + x) * 3 + c];
                t[(c * size + y) * size + x] = match preset {
                    Preset::Sam => (v - PIXEL_MEAN[c]) / PIXEL_STD[c],
                    Preset::Medsa => v / 255.0,
                    Preset::LiteMedsam => (v - lo) / range,
                };
            }
        }
    }
    Ok(Prepared {
        tensor: Tensor::from_vec(t, &[1, 3, size, size])?,
        input_size: (h, w),
        original_size: (img.height, img.width),
        uniform_scale: (preset == Preset::LiteMedsam)
            .then(|| size as f32 / img.height.max(img.width) as f32),
    })
}

/// Writes a binary mask (`logits > 0` -> 255) of `[H, W]` logits as an 8-bit PNG, atomically.
pub fn write_mask_png(path: &Path, logits: &[f32], h: usize, w: usize) -> Result<()> {
    let px: Vec<u8> = logits
        .iter()
        .map(|&v| if v > 0.0 { 255 } else { 0 })
        .collect();
    write_gray_png(path, &px, h, w)
}

/// Writes an 8-bit grey PNG of `h x w` pixels, atomically.
pub fn write_gray_png(path: &Path, px: &[u8], h: usize, w: usize) -> Result<()> {
    let img = image::GrayImage::from_raw(w as u32, h as u32, px.to_vec()).ok_or_else(|| {
        Error::Input(format!(
            "{}: {} values are not {w}x{h}",
            path.display(),
            px.len()
        ))
    })?;
    write_png_atomic(path, &image::DynamicImage::ImageLuma8(img))
}

/// Encodes any image as PNG and writes it atomically (temporary file + rename).
pub fn write_png_atomic(path: &Path, img: &image::DynamicImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Input(format!("{}: cannot encode PNG: {e}", path.display())))?;
    crate::weights::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_shape_rounds_like_sam() {
        assert_eq!(preprocess_shape(300, 400, 1024), (768, 1024));
        assert_eq!(preprocess_shape(333, 500, 1024), (682, 1024));
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let img = RgbImage {
            height: 7,
            width: 5,
            data: vec![42.0; 7 * 5 * 3],
        };
        for (h, w) in [(3, 2), (14, 10), (7, 5)] {
            let r = resize(&img, h, w);
            assert!(r.data.iter().all(|v| (v - 42.0).abs() < 1e-4));
        }
    }
}
