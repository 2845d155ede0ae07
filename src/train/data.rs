//! Training data for `medsa-engine train`: datasets of 2D images or NIfTI volumes with label
//! maps, a deterministic train/validation split by case, and a loader that yields batches of
//! preprocessed images, masks and sampled prompts.
//!
//! # Layouts
//!
//! - A folder with `images/` and `masks/`: 2D images (`.png`, `.jpg`, `.jpeg`) paired by stem
//!   with PNG label maps (`images/case1.jpg` <-> `masks/case1.png`). Masks must be PNG: JPEG
//!   would blur label ids. `labels/` is accepted in place of `masks/`.
//! - A folder with `images/` and `labels/`: NIfTI volumes (`.nii`, `.nii.gz`) paired by stem
//!   (extension stripped) with NIfTI label volumes of the same dims. `masks/` is accepted in place
//!   of `labels/`.
//! - A JSON manifest `{"cases": [{"image": path, "mask": path}, ...]}` (or a bare list; `label`
//!   is accepted for `mask`), paths relative to the manifest, all images of one kind.
//!
//! Every image needs a mask and every mask an image; a stray file of either is an error naming it,
//! because an unpaired file is almost always a naming mistake that would silently shrink the data.
//! Files of other types (a README, `.DS_Store`) are ignored. Cases are sorted by file name, so the
//! case order, the split and the batches do not depend on the file system.
//!
//! # Masks
//!
//! Label maps are integers (8/16-bit grey PNG, any NIfTI datatype rounded to the nearest integer).
//! `label_id: Some(id)` trains on one structure (`value == id`); `None` on all foreground
//! (`value > 0`). Masks are resized to the model input with nearest neighbour (the source pixel
//! under each output pixel's centre), so they stay binary and follow the image's resize.
//!
//! # Preprocessing
//!
//! Images go through [`pipeline::prepare`]: by default the Med-SA preset (SPEC section 5: stretch
//! to S x S, intensities in [0, 1], grey repeated to 3 channels, no mean/std); the SAM preset
//! (keep aspect, normalise, pad) also works, with the mask resized to the same unpadded region
//! and padded with background. Volumes are first mapped to [0, 1] by an [`Intensity`] preset of
//! `batch.rs` (CT window, MR percentiles over the whole volume, or none) and cut into slices along
//! the third axis (slice k: `ny` rows by `nx` columns, as `segment` reads them).
//!
//! # Memory
//!
//! Cases are decoded once and cached (training datasets are small), in half precision: values in
//! [0, 1] keep an error below 2.5e-4, a sixteenth of an 8-bit grey step. 2D images are cached
//! preprocessed at S x S (one channel when the three are equal); volume slices are cached at
//! their native size after the intensity mapping, and only the slices a sample can touch (those
//! with foreground, and for depth chunks their `d - 1` neighbours each side): a CT with the organ
//! in 40 of 200 slices keeps ~40-50 slices. They are resized to S x S when sampled, which costs
//! far less than the encoder pass that follows.
//!
//! # Samples
//!
//! One sample per epoch for each 2D case, for each volume slice with foreground (`depth: None`),
//! or for each volume `ceil(f / d)` chunks of `d` consecutive slices (`depth: Some(d)`, `f` its
//! foreground slices). A chunk is placed by drawing a foreground slice uniformly, then the chunk
//! start uniformly among the starts whose chunk contains that slice and fits in the volume, so
//! every chunk contains foreground and the foreground slice sits anywhere in it. Cases or slices
//! whose mask is empty at the model size (absent label, or a structure that vanishes in the
//! resize) are left out when the dataset loads and listed by [`Dataset::skipped_empty`].
//!
//! # Prompts
//!
//! Each image (each slice of a chunk) gets its prompts from [`crate::train::sampler::sample`] on
//! its S x S mask, in model-input pixels `(x, y)`: `pos` clicks on the foreground, `neg` on the
//! background and optionally the jittered bounding box. All images of a batch carry the same
//! number of points, `pos + neg`: missing ones (no background to click) are padding points with
//! label -1, as SAM pads. A slice of a chunk without foreground gets that many negative clicks at
//! uniform random pixels (the reference's rule for empty slices: one click labelled 0) and, when
//! boxes are on, the whole image as its box (SAM's prompts need one box per image or none).
//!
//! # Determinism
//!
//! Epoch e's order is a shuffle seeded by `(seed, e)`; the sample at position p of epoch e draws
//! its chunk placement and prompts from a generator seeded by `(seed, e, p)`. The loader's whole
//! state is therefore three integers ([`LoaderState`]): the same seed gives the same batches,
//! and a training run resumes exactly from a saved state without replaying earlier batches.

use half::f16;
use rayon::prelude::*;

use crate::batch::{self, Intensity};
use crate::data::nifti;
use crate::error::{Error, Result};
use crate::pipeline::{self, Preset, RgbImage};
use crate::sam::random::Rng;
use crate::tensor::Tensor;

/// How cases become model inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// Model input size S (square).
    pub size: usize,
    /// Image preset ([`Preset::Medsa`] is what the reference trains with).
    pub preset: Preset,
    /// Train on one label (`value == id`), or on all foreground (`None`: `value > 0`).
    pub label_id: Option<u32>,
    /// Volume intensities to [0, 1] (ignored for 2D images).
    pub intensity: Intensity,
    /// Volumes: chunks of `d` consecutive slices for the depth branch, or single slices.
    pub depth: Option<usize>,
}

impl Default for DataOptions {
    /// 1024 x 1024 Med-SA preset, all foreground, the reference's CT window, single slices.
    fn default() -> Self {
        DataOptions {
            size: 1024,
            preset: Preset::Medsa,
            label_id: None,
            intensity: Intensity::Window(-175.0, 250.0),
            depth: None,
        }
    }
}

/// A volume slice cached at its native size: intensities in [0, 1] and the selected mask.
struct Plane {
    pixels: Vec<f16>,
    mask: Vec<bool>,
}

enum Store {
    /// A 2D case preprocessed at S x S: `channels` (1 or 3) planes and the S x S mask.
    Image {
        channels: usize,
        pixels: Vec<f16>,
        mask: Vec<bool>,
    },
    /// A volume: `planes[k]` is cached for the slices a sample can touch; `fg` lists the slices
    /// whose mask has foreground at the model size.
    Volume {
        dims: [usize; 3],
        planes: Vec<Option<Plane>>,
        fg: Vec<usize>,
    },
}

struct Loaded {
    name: String,
    store: Store,
    /// Samples left out because their mask is empty at the model size.
    empty: Vec<String>,
}

/// One epoch entry: a case and, for single volume slices, the slice.
#[derive(Clone, Copy, Debug)]
struct Item {
    case: usize,
    slice: Option<usize>,
}

/// A loaded, cached training dataset.
pub struct Dataset {
    kind: DataKind,
    pub(super) opts: DataOptions,
    cases: Vec<Loaded>,
    items: Vec<Item>,
}

/// Whether a label value selects the trained structure (values rounded to integers).
fn selects(v: f64, label_id: Option<u32>) -> bool {
    let v = v.round();
    match label_id {
        Some(id) => v == id as f64,
        None => v > 0.0,
    }
}

/// Nearest-neighbour resize of an `h x w` mask onto the model input: the `S x S` grid for the
/// Med-SA preset, or SAM's resized region padded with background.
fn mask_to_model(mask: &[bool], h: usize, w: usize, size: usize, preset: Preset) -> Vec<bool> {
    let (ih, iw) = match preset {
        Preset::Medsa => (size, size),
        Preset::Sam | Preset::LiteMedsam => pipeline::preprocess_shape(h, w, size),
    };
    let src = |i: usize, n: usize, m: usize| {
        (((i as f64 + 0.5) * n as f64 / m as f64) as usize).min(n - 1)
    };
    let mut out = vec![false; size * size];
    for y in 0..ih.min(size) {
        let sy = src(y, h, ih);
        for x in 0..iw.min(size) {
            out[y * size + x] = mask[sy * w + src(x, w, iw)];
        }
    }
    out
}

/// `[1, 3, S, S]` preprocessed values of a grey plane in [0, 1].
fn prepare_grey(plane: &[f32], h: usize, w: usize, opts: &DataOptions) -> Result<Tensor> {
    let img = RgbImage {
        height: h,
        width: w,
        data: plane.iter().flat_map(|&v| [v * 255.0; 3]).collect(),
    };
    Ok(pipeline::prepare(&img, opts.size, opts.preset)?.tensor)
}

fn load_image_case(c: &CaseFiles, opts: &DataOptions) -> Result<Loaded> {
    let img = pipeline::load_image(&c.image)?;
    let (ids, h, w) = batch::load_label_png(&c.mask)?;
    if (h, w) != (img.height, img.width) {
        return Err(Error::Format {
            path: c.mask.clone(),
            msg: format!(
                "mask is {w}x{h} pixels but its image {} is {}x{}",
                c.image.display(),
                img.width,
                img.height
            ),
        });
    }
    let native: Vec<bool> = ids
        .iter()
        .map(|&v| selects(v as f64, opts.label_id))
        .collect();
    let s = opts.size;
    let prep = pipeline::prepare(&img, s, opts.preset)?;
    let t = prep.tensor.data();
    let n = s * s;
    let grey = t[..n] == t[n..2 * n] && t[..n] == t[2 * n..];
    let channels = if grey { 1 } else { 3 };
    let pixels = t[..channels * n]
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let mask = mask_to_model(&native, h, w, s, opts.preset);
    let empty = if mask.iter().any(|&m| m) {
        Vec::new()
    } else {
        vec![c.name.clone()]
    };
    Ok(Loaded {
        name: c.name.clone(),
        store: Store::Image {
            channels,
            pixels,
            mask,
        },
        empty,
    })
}

fn load_volume_case(c: &CaseFiles, opts: &DataOptions) -> Result<Loaded> {
    let vol = nifti::read_nifti(&c.image)?;
    let lab = nifti::read_nifti(&c.mask)?;
    if lab.dims != vol.dims {
        return Err(Error::Format {
            path: c.mask.clone(),
            msg: format!(
                "label volume has dims {:?} but its image {} has {:?}",
                lab.dims,
                c.image.display(),
                vol.dims
            ),
        });
    }
    let [nx, ny, nz] = vol.dims;
    if let Some(d) = opts.depth {
        if nz < d {
            return Err(Error::Format {
                path: c.image.clone(),
                msg: format!("{nz} slices (dim[3]), fewer than the depth chunk of {d} slices"),
            });
        }
    }
    let mut data = vol.data;
    opts.intensity.apply(&mut data);
    let plane = nx * ny;
    let masks: Vec<Vec<bool>> = (0..nz)
        .map(|k| {
            lab.data[k * plane..(k + 1) * plane]
                .iter()
                .map(|&v| selects(v as f64, opts.label_id))
                .collect()
        })
        .collect();
    let mut fg = Vec::new();
    let mut empty = Vec::new();
    for (k, m) in masks.iter().enumerate() {
        if m.iter().any(|&b| b) {
            if mask_to_model(m, ny, nx, opts.size, opts.preset)
                .iter()
                .any(|&b| b)
            {
                fg.push(k);
            } else {
                empty.push(format!("{} slice {k}", c.name));
            }
        }
    }
    let mut keep = vec![false; nz];
    let reach = opts.depth.map_or(0, |d| d - 1);
    for &f in &fg {
        keep[f.saturating_sub(reach)..=(f + reach).min(nz - 1)].fill(true);
    }
    let planes = masks
        .into_iter()
        .enumerate()
        .map(|(k, mask)| {
            keep[k].then(|| Plane {
                pixels: data[k * plane..(k + 1) * plane]
                    .iter()
                    .map(|&v| f16::from_f32(v))
                    .collect(),
                mask,
            })
        })
        .collect();
    Ok(Loaded {
        name: c.name.clone(),
        store: Store::Volume {
            dims: [nx, ny, nz],
            planes,
            fg,
        },
        empty,
    })
}

/// One training sample: an image (or a chunk of `d` slices) and its mask at the model input.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Index of the case in the dataset.
    pub case: usize,
    /// The case's name.
    pub name: String,
    /// Volumes: the (first) slice; `None` for 2D images.
    pub slice: Option<usize>,
    /// Model input size S.
    pub size: usize,
    /// `[n, 3, S, S]` preprocessed images: n = 1, or d slices of a chunk in order.
    pub image: Tensor,
    /// `n * S * S` mask values at the model input, row-major, image by image.
    pub mask: Vec<bool>,
}

impl Sample {
    /// Number of images (1, or the chunk's d slices).
    pub fn planes(&self) -> usize {
        self.image.dim(0)
    }

    /// The S x S mask of image `i`.
    pub fn plane_mask(&self, i: usize) -> &[bool] {
        let n = self.size * self.size;
        &self.mask[i * n..(i + 1) * n]
    }

    /// The training target on the decoder's `g x g` low-resolution grid (`g = S / 4` for SAM's
    /// masks), `[n, 1, g, g]` of 0/1; see [`downsample_mask`].
    pub fn target(&self, g: usize) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.planes() * g * g);
        for i in 0..self.planes() {
            out.extend(downsample_mask(self.plane_mask(i), self.size, g)?);
        }
        Tensor::from_vec(out, &[self.planes(), 1, g, g])
    }
}

/// Per output index of an `n -> m` area resize: the source indices and their overlap weights
/// (each output cell covers `n / m` source cells, partially at its edges).
fn area_weights(n: usize, m: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = n as f64 / m as f64;
    (0..m)
        .map(|i| {
            let (lo, hi) = (i as f64 * scale, (i + 1) as f64 * scale);
            (lo.floor() as usize..(hi.ceil() as usize).min(n))
                .map(|j| (j, ((j + 1) as f64).min(hi) - (j as f64).max(lo)))
                .filter(|&(_, w)| w > 0.0)
                .collect()
        })
        .collect()
}

/// An `s x s` mask on a `g x g` grid: each cell takes the fraction of its area covered by the
/// mask (area averaging, exact when `g` does not divide `s`) and is 1 when that fraction is at
/// least 0.5, else 0. Area averaging keeps a thin structure that a nearest-neighbour pick could
/// miss entirely, and the threshold keeps targets binary as the losses expect.
pub fn downsample_mask(mask: &[bool], s: usize, g: usize) -> Result<Vec<f32>> {
    if mask.len() != s * s || g == 0 || g > s {
        return Err(Error::Input(format!(
            "downsample_mask: {} values for a {s}x{s} mask onto a {g}x{g} grid: expected {} values and 1 <= g <= {s}",
            mask.len(),
            s * s
        )));
    }
    let wts = area_weights(s, g);
    let cell = (s as f64 / g as f64).powi(2);
    let mut out = vec![0f32; g * g];
    for (i, rows) in wts.iter().enumerate() {
        for (j, cols) in wts.iter().enumerate() {
            let mut cover = 0f64;
            for &(r, wr) in rows {
                for &(c, wc) in cols {
                    if mask[r * s + c] {
                        cover += wr * wc;
                    }
                }
            }
            out[i * g + j] = if cover / cell >= 0.5 { 1.0 } else { 0.0 };
        }
    }
    Ok(out)
}

pub(super) fn pick(rng: &mut Rng, n: usize) -> usize {
    ((rng.uniform() as f64 * n as f64) as usize).min(n - 1)
}

pub(super) fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = pick(rng, i + 1);
        v.swap(i, j);
    }
}

/// SplitMix64 finaliser: decorrelates the seeds of the per-epoch and per-sample generators.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(super) fn derive(seed: u64, a: u64, b: u64) -> u64 {
    mix(mix(mix(seed) ^ a) ^ b)
}

/// Stream tags, so the split, the epoch orders and the samples never share a generator.
pub(super) const ORDER_STREAM: u64 = 0x4f52_4445_5200_0000;

impl Dataset {
    /// Decodes, checks and caches `cases` (in parallel), and lists the epoch's samples. Fails on
    /// the first bad case (in case order) with its file named, on options that do not fit the
    /// data, and when no sample has foreground.
    pub fn load(kind: DataKind, cases: &[CaseFiles], opts: &DataOptions) -> Result<Self> {
        if cases.is_empty() {
            return Err(Error::Input("the training set has no cases".into()));
        }
        if opts.size == 0 {
            return Err(Error::Input("model input size 0: expected S >= 1".into()));
        }
        match (kind, opts.depth) {
            (_, Some(0)) => {
                return Err(Error::Input(
                    "depth chunk of 0 slices: expected d >= 1".into(),
                ))
            }
            (DataKind::Images, Some(d)) => {
                return Err(Error::Input(format!(
                    "a depth chunk of {d} slices needs NIfTI volumes; this dataset has 2D images"
                )))
            }
            _ => {}
        }
        let loaded: Vec<Result<Loaded>> = cases
            .par_iter()
            .map(|c| match kind {
                DataKind::Images => load_image_case(c, opts),
                DataKind::Volumes => load_volume_case(c, opts),
            })
            .collect();
        let cases: Vec<Loaded> = loaded.into_iter().collect::<Result<_>>()?;
        let mut items = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            match &c.store {
                Store::Image { .. } => {
                    if c.empty.is_empty() {
                        items.push(Item {
                            case: i,
                            slice: None,
                        });
                    }
                }
                Store::Volume { fg, .. } => match opts.depth {
                    None => items.extend(fg.iter().map(|&k| Item {
                        case: i,
                        slice: Some(k),
                    })),
                    Some(d) => items.extend(std::iter::repeat_n(
                        Item {
                            case: i,
                            slice: None,
                        },
                        fg.len().div_ceil(d),
                    )),
                },
            }
        }
        if items.is_empty() {
            let what = opts
                .label_id
                .map_or("any foreground (value > 0)".to_string(), |id| {
                    format!("label {id}")
                });
            return Err(Error::Input(format!(
                "no case has {what} in its mask at the model size {}; check the label id and the masks",
                opts.size
            )));
        }
        Ok(Dataset {
            kind,
            opts: opts.clone(),
            cases,
            items,
        })
    }

    /// 2D images or volumes.
    pub fn kind(&self) -> DataKind {
        self.kind
    }

    /// The options the dataset was loaded with.
    pub fn options(&self) -> &DataOptions {
        &self.opts
    }

    /// Samples per epoch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is no sample (never true for a loaded dataset).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of cases.
    pub fn num_cases(&self) -> usize {
        self.cases.len()
    }

    /// Case names, in case order.
    pub fn case_names(&self) -> Vec<&str> {
        self.cases.iter().map(|c| c.name.as_str()).collect()
    }

    /// Samples left out because their mask is empty at the model size: case names, or
    /// `"name slice k"` for volume slices that have foreground only before the resize.
    pub fn skipped_empty(&self) -> Vec<String> {
        self.cases.iter().flat_map(|c| c.empty.clone()).collect()
    }

    /// Volumes: the slices of case `case` with foreground at the model size (empty for images).
    pub fn foreground_slices(&self, case: usize) -> &[usize] {
        match self.cases.get(case).map(|c| &c.store) {
            Some(Store::Volume { fg, .. }) => fg,
            _ => &[],
        }
    }

    /// Bytes held by the cache (images, slices and masks).
    pub fn cached_bytes(&self) -> usize {
        self.cases
            .iter()
            .map(|c| match &c.store {
                Store::Image { pixels, mask, .. } => pixels.len() * 2 + mask.len(),
                Store::Volume { planes, .. } => planes
                    .iter()
                    .flatten()
                    .map(|p| p.pixels.len() * 2 + p.mask.len())
                    .sum(),
            })
            .sum()
    }

    /// Builds sample `index` of the epoch list; `rng` places depth chunks.
    pub fn sample(&self, index: usize, rng: &mut Rng) -> Result<Sample> {
        let item = *self.items.get(index).ok_or_else(|| {
            Error::Input(format!(
                "sample {index} requested from a dataset of {} samples",
                self.items.len()
            ))
        })?;
        let c = &self.cases[item.case];
        let s = self.opts.size;
        let n = s * s;
        match &c.store {
            Store::Image {
                channels,
                pixels,
                mask,
            } => {
                let mut data = Vec::with_capacity(3 * n);
                for ch in 0..3 {
                    let src = if *channels == 1 { 0 } else { ch };
                    data.extend(pixels[src * n..(src + 1) * n].iter().map(|v| v.to_f32()));
                }
                Ok(Sample {
                    case: item.case,
                    name: c.name.clone(),
                    slice: None,
                    size: s,
                    image: Tensor::from_vec(data, &[1, 3, s, s])?,
                    mask: mask.clone(),
                })
            }
            Store::Volume { dims, planes, fg } => {
                let [nx, ny, nz] = *dims;
                let (first, count) = match (item.slice, self.opts.depth) {
                    (Some(k), _) => (k, 1),
                    (None, Some(d)) => {
                        let f = fg[pick(rng, fg.len())];
                        let lo = f.saturating_sub(d - 1);
                        let hi = f.min(nz - d);
                        (lo + pick(rng, hi - lo + 1), d)
                    }
                    (None, None) => {
                        return Err(Error::Input(format!(
                            "{}: volume sample without a slice outside depth mode",
                            c.name
                        )))
                    }
                };
                let mut data = Vec::with_capacity(count * 3 * n);
                let mut mask = Vec::with_capacity(count * n);
                for (k, p) in planes.iter().enumerate().skip(first).take(count) {
                    let p = p.as_ref().ok_or_else(|| {
                        Error::Input(format!("{}: slice {k} is not cached", c.name))
                    })?;
                    let grey: Vec<f32> = p.pixels.iter().map(|v| v.to_f32()).collect();
                    data.extend_from_slice(prepare_grey(&grey, ny, nx, &self.opts)?.data());
                    mask.extend(mask_to_model(&p.mask, ny, nx, s, self.opts.preset));
                }
                Ok(Sample {
                    case: item.case,
                    name: c.name.clone(),
                    slice: Some(first),
                    size: s,
                    image: Tensor::from_vec(data, &[count, 3, s, s])?,
                    mask,
                })
            }
        }
    }
}

pub use super::cases::{discover, split, CaseFiles, DataKind};
pub use super::loader::{Batch, Loader, LoaderOptions, LoaderState};
