//! Volumes without ground truth: one prompt on one slice (a 2D box or clicks, or the middle
//! slice of a 3D box) segments the structure through the whole volume, and clicks on any slice
//! refine it.
//!
//! # The rule
//!
//! 1. **Seed.** An object's box gives the seed slice: the slice of a 2D box (`z0 == z1`), or the
//!    middle slice `(z0 + z1) / 2` (rounded down) of a 3D box, whose slice range then bounds the
//!    walk. Without a box, the object's points give it (they must all be on one slice). The seed
//!    slice is decoded with the box and the points on it.
//! 2. **Walk.** From the seed, up (`z + 1`, ...) and then down, each next slice is prompted with
//!    the bounding box of the previous slice's mask grown by `margin` pixels on every side
//!    (clamped to the slice), and, with `mask_input`, the previous slice's low-resolution logits
//!    (for models trained with mask inputs; SAM's own interactive loop feeds them back).
//! 3. **Stop.** A walk ends before the first slice whose mask has fewer than `min_area` pixels,
//!    a predicted IoU under `min_iou` or a stability score under `min_stability` (that slice
//!    stays background); at the end of the volume, at the ends of the 3D box when one was given,
//!    or after `max_slices` slices on that side of the seed. Past the end of a structure the
//!    previous box still covers some texture, and a box-trained model tends to fill it: the two
//!    scores are what tell that mask from a real one (measured on LiteMedSAM, `docs/PROPAGATION.md`).
//! 4. **Refinement.** Each interaction (clicks on one slice) is applied in order: that slice is
//!    decoded again with every click given on it so far, the box it was last prompted with, and
//!    its current low-res logits as `mask_input`; then (unless the interaction says
//!    `"propagate": false`) the walk restarts from that slice in both directions, replacing what
//!    the earlier walk found there, and slices past the new ends are cleared.
//!
//! Objects are walked one after another against the same embeddings: the encoder runs once per
//! chunk of `chunk` slices (with the SD-Trans depth branch across the chunk), only for chunks
//! the walks reach, and every later decode on those slices reuses it. No label file is read.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::pipeline::Prepared;
use crate::tensor::Tensor;

use super::cases::Object;
use super::job::Job;
use super::prompts::check_inside;

/// How a prompt on one slice is carried through a volume (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Propagation {
    /// Pixels added on every side of the previous slice's mask box.
    pub margin: f32,
    /// A slice whose mask has fewer pixels than this ends the walk.
    pub min_area: usize,
    /// A slice whose mask the decoder scores below this predicted IoU ends the walk.
    pub min_iou: f32,
    /// A slice whose mask has a lower stability score (SAM's: the IoU of the masks at logits
    /// +1 and -1) ends the walk.
    pub min_stability: f32,
    /// At most this many slices on each side of the seed (`None`: no limit).
    pub max_slices: Option<usize>,
    /// Also prompt each slice with the previous slice's low-res logits.
    pub mask_input: bool,
}

impl Default for Propagation {
    fn default() -> Self {
        Propagation {
            margin: 2.0,
            min_area: 10,
            min_iou: 0.75,
            min_stability: 0.75,
            max_slices: None,
            mask_input: false,
        }
    }
}

/// What one slice of one object holds: how it was prompted and what came out.
#[derive(Clone)]
struct SliceState {
    /// The box it was prompted with, `(x0, y0, x1, y1)` in pixels (`None`: points only).
    bbox: Option<[f32; 4]>,
    /// Clicks given on this slice, `(x, y, label)`.
    points: Vec<[f32; 3]>,
    /// Mask logits at the slice's size (`ny * nx`).
    logits: Vec<f32>,
    /// The decoder's low-res logits `[1, 1, h, w]` (the next prompt's `mask_input`).
    low: Tensor,
    /// The decoder's predicted IoU of the mask.
    iou: f32,
}

impl SliceState {
    fn area(&self) -> usize {
        self.logits.iter().filter(|&&v| v > 0.0).count()
    }

    /// SAM's stability score: the IoU of the masks thresholded at logits +1 and -1 (how little
    /// the mask moves when the threshold does). Masks the model makes up in structureless
    /// texture are unstable.
    fn stability(&self) -> f32 {
        let hi = self.logits.iter().filter(|&&v| v > 1.0).count();
        let lo = self.logits.iter().filter(|&&v| v > -1.0).count();
        if lo == 0 {
            return 0.0;
        }
        hi as f32 / lo as f32
    }

    /// Whether a walk keeps this slice (and goes on from it).
    fn holds(&self, rule: &Propagation) -> bool {
        self.area() >= rule.min_area
            && self.iou >= rule.min_iou
            && self.stability() >= rule.min_stability
    }
}

/// Encoder passes over a volume, run when a walk first reaches a chunk and kept for the case.
pub(super) struct Embeddings<'v, B: Backend> {
    data: &'v [f32],
    dims: [usize; 3],
    chunk: usize,
    done: BTreeMap<usize, (B::Tensor, Vec<Prepared>)>,
    /// Slices encoded so far.
    pub encoded: usize,
}

impl<'v, B: Backend> Embeddings<'v, B> {
    pub(super) fn new(data: &'v [f32], dims: [usize; 3], chunk: usize) -> Self {
        Embeddings {
            data,
            dims,
            chunk,
            done: BTreeMap::new(),
            encoded: 0,
        }
    }

    /// The embeddings of the chunk holding slice `z`, the slice's place in it and its
    /// preprocessing; encodes the chunk on first use.
    fn get(&mut self, job: &Job<'_, B>, z: usize) -> Result<(&B::Tensor, usize, &Prepared)> {
        let c = z / self.chunk;
        if !self.done.contains_key(&c) {
            let k0 = c * self.chunk;
            let d = self.chunk.min(self.dims[2] - k0);
            let enc = job.encode_chunk(self.data, self.dims, k0, d)?;
            self.encoded += d;
            self.done.insert(c, enc);
        }
        let (emb, preps) = &self.done[&c];
        let b = z - c * self.chunk;
        Ok((emb, b, &preps[b]))
    }
}

/// One object's seed: slice, box, points on it, and the 3D box's slice range.
#[derive(Debug)]
struct Seed {
    z: usize,
    bbox: Option<[f32; 4]>,
    points: Vec<[f32; 3]>,
    range: Option<(usize, usize)>,
}

fn seed_of(case: &str, k: usize, o: &Object, dims: [usize; 3]) -> Result<Seed> {
    let [nx, ny, nz] = dims;
    let slice_of = |z: f32, what: &str| -> Result<usize> {
        let r = z.round();
        if !(r >= 0.0 && r < nz as f32) {
            return Err(Error::Input(format!(
                "{case}: object {k} {what} z = {z} is outside 0..{}",
                nz - 1
            )));
        }
        Ok(r as usize)
    };
    let mut seed = Seed {
        z: 0,
        bbox: None,
        points: Vec::new(),
        range: None,
    };
    if let Some(b) = o.bbox {
        check_inside(case, &format!("object {k} box corner"), b[0], b[1], nx, ny)?;
        check_inside(case, &format!("object {k} box corner"), b[3], b[4], nx, ny)?;
        let (z0, z1) = (slice_of(b[2], "box")?, slice_of(b[5], "box")?);
        if b[3] < b[0] || b[4] < b[1] || z1 < z0 {
            return Err(Error::Input(format!(
                "{case}: object {k}: box {b:?} needs x0 <= x1, y0 <= y1 and z0 <= z1"
            )));
        }
        seed.z = (z0 + z1) / 2;
        seed.bbox = Some([b[0], b[1], b[3], b[4]]);
        seed.range = (z1 > z0).then_some((z0, z1));
    }
    let mut point_slice = None;
    for p in &o.points {
        check_inside(case, &format!("object {k} point"), p[0], p[1], nx, ny)?;
        let z = slice_of(p[2], "point")?;
        if p[3] != 0.0 && p[3] != 1.0 {
            return Err(Error::Input(format!(
                "{case}: object {k}: point label {} is not 0 or 1",
                p[3]
            )));
        }
        if o.bbox.is_none() && *point_slice.get_or_insert(z) != z {
            return Err(Error::Input(format!(
                "{case}: object {k}: to propagate, the seed's points must be on one slice (found \
                 z = {} and z = {z}); give clicks on other slices as interactions",
                point_slice.unwrap_or(z)
            )));
        }
        // With a box, points join it on the seed slice; a click elsewhere is a refinement, and
        // dropping it silently would lose the user's prompt.
        if o.bbox.is_some() && z != seed.z {
            return Err(Error::Input(format!(
                "{case}: object {k}: a point on slice {z} is not on the box's seed slice {}; \
                 give clicks on other slices as interactions",
                seed.z
            )));
        }
        seed.points.push([p[0], p[1], p[3]]);
    }
    if let Some(z) = point_slice {
        seed.z = z;
    }
    if o.bbox.is_none() && o.points.is_empty() {
        return Err(Error::Input(format!(
            "{case}: object {k} has no box and no points to start from"
        )));
    }
    Ok(seed)
}

/// The bounding box of a mask (`logits > 0`, `ny` rows of `nx`) grown by `margin`, clamped.
fn mask_box(logits: &[f32], nx: usize, ny: usize, margin: f32) -> Option<[f32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for y in 0..ny {
        for x in 0..nx {
            if logits[y * nx + x] > 0.0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    if x0 == usize::MAX {
        return None;
    }
    let (w, h) = ((nx - 1) as f32, (ny - 1) as f32);
    Some([
        (x0 as f32 - margin).max(0.0),
        (y0 as f32 - margin).max(0.0),
        (x1 as f32 + margin).min(w),
        (y1 as f32 + margin).min(h),
    ])
}

/// The masks of every object of a volume, however they were prompted.
pub struct VolumeMasks {
    /// Label map, `nx * ny * nz`.
    pub labels: Vec<u8>,
    /// Per-voxel maximum probability over the objects.
    pub prob: Vec<f32>,
    /// Slices that hold some object.
    pub slices: Vec<usize>,
}

impl<B: Backend> Job<'_, B> {
    /// Decodes slice `z` with `bbox`, `points` and optionally `mask_input`.
    fn decode_slice(
        &self,
        emb: &mut Embeddings<'_, B>,
        z: usize,
        bbox: Option<[f32; 4]>,
        points: &[[f32; 3]],
        mask_input: Option<&Tensor>,
    ) -> Result<SliceState> {
        let (e, b, prep) = emb.get(self, z)?;
        let mut p = super::prompts::object_prompts(&[(points.to_vec(), bbox)], prep)?
            .pop()
            .unwrap_or_default();
        p.mask_inputs = mask_input.cloned();
        let one = self.be.index_select0(e, &[b])?;
        let (logits, low, iou) = self.decode_logits(&one, prep, &p)?;
        Ok(SliceState {
            bbox,
            points: points.to_vec(),
            logits,
            low,
            iou,
        })
    }

    /// Walks from `from` (already decoded into `masks[from]`) in direction `step` (+1 or -1)
    /// until the rule stops; clears the slices past the end.
    fn walk(
        &self,
        emb: &mut Embeddings<'_, B>,
        masks: &mut [Option<SliceState>],
        from: usize,
        step: isize,
        seed: &Seed,
        rule: &Propagation,
    ) -> Result<()> {
        let [nx, ny, nz] = emb.dims;
        let (lo, hi) = seed.range.unwrap_or((0, nz - 1));
        let mut z = from;
        loop {
            let next = z as isize + step;
            let stop = next < lo as isize
                || next > hi as isize
                || rule
                    .max_slices
                    .is_some_and(|m| (next - seed.z as isize).unsigned_abs() > m);
            if stop {
                break;
            }
            let next = next as usize;
            let prev = masks[z].as_ref().expect("walks start from a decoded slice");
            let Some(bbox) = mask_box(&prev.logits, nx, ny, rule.margin) else {
                break;
            };
            let mi = rule.mask_input.then(|| prev.low.clone());
            let s = self.decode_slice(emb, next, Some(bbox), &[], mi.as_ref())?;
            if !s.holds(rule) {
                break;
            }
            masks[next] = Some(s);
            z = next;
        }
        // Past the new end, what an earlier walk found came from a chain that no longer holds.
        let mut c = z as isize + step;
        while c >= 0 && (c as usize) < nz {
            masks[c as usize] = None;
            c += step;
        }
        Ok(())
    }

    /// Propagates every object of a volume (intensities already mapped) from its seed, then
    /// applies its interactions in order.
    pub(super) fn propagate_volume(
        &self,
        case: &str,
        data: &[f32],
        dims: [usize; 3],
        objects: &[Object],
        rule: &Propagation,
    ) -> Result<(VolumeMasks, usize)> {
        let [nx, ny, nz] = dims;
        let plane = nx * ny;
        let mut emb = Embeddings::<B>::new(data, dims, self.opts.chunk);
        let mut out = VolumeMasks {
            labels: vec![0u8; plane * nz],
            prob: vec![
                0f32;
                if self.opts.probabilities {
                    plane * nz
                } else {
                    0
                }
            ],
            slices: Vec::new(),
        };
        let mut touched = vec![false; nz];
        for (k, o) in objects.iter().enumerate() {
            let id = (k + 1) as u8;
            let seed = seed_of(case, k, o, dims)?;
            let mut masks: Vec<Option<SliceState>> = vec![None; nz];
            let s = self.decode_slice(&mut emb, seed.z, seed.bbox, &seed.points, None)?;
            if s.area() >= rule.min_area {
                masks[seed.z] = Some(s);
                self.walk(&mut emb, &mut masks, seed.z, 1, &seed, rule)?;
                self.walk(&mut emb, &mut masks, seed.z, -1, &seed, rule)?;
            }
            for (i, it) in o.interactions.iter().enumerate() {
                let ctx = format!("object {k} interaction {i}");
                let mut z = None;
                let mut clicks = Vec::new();
                for p in &it.points {
                    check_inside(case, &format!("{ctx} point"), p[0], p[1], nx, ny)?;
                    let pz = p[2].round();
                    if !(pz >= 0.0 && pz < nz as f32) || *z.get_or_insert(pz) != pz {
                        return Err(Error::Input(format!(
                            "{case}: {ctx}: its points must be on one slice inside 0..{} (got z = {})",
                            nz - 1,
                            p[2]
                        )));
                    }
                    if p[3] != 0.0 && p[3] != 1.0 {
                        return Err(Error::Input(format!(
                            "{case}: {ctx}: point label {} is not 0 or 1",
                            p[3]
                        )));
                    }
                    clicks.push([p[0], p[1], p[3]]);
                }
                let Some(z) = z.map(|z| z as usize) else {
                    return Err(Error::Input(format!("{case}: {ctx} has no points")));
                };
                let (bbox, mut points, mi) = match &masks[z] {
                    Some(m) => (m.bbox, m.points.clone(), Some(m.low.clone())),
                    None => (None, Vec::new(), None),
                };
                points.extend(clicks);
                let s = self.decode_slice(&mut emb, z, bbox, &points, mi.as_ref())?;
                masks[z] = (s.area() >= rule.min_area).then_some(s);
                if it.propagate && masks[z].is_some() {
                    let from = Seed {
                        z,
                        bbox,
                        points: Vec::new(),
                        range: seed.range,
                    };
                    self.walk(&mut emb, &mut masks, z, 1, &from, rule)?;
                    self.walk(&mut emb, &mut masks, z, -1, &from, rule)?;
                }
            }
            for (z, m) in masks.iter().enumerate() {
                let Some(m) = m else { continue };
                touched[z] = true;
                let lab = &mut out.labels[z * plane..(z + 1) * plane];
                for (l, &v) in lab.iter_mut().zip(&m.logits) {
                    if v > 0.0 {
                        *l = id;
                    }
                }
                if self.opts.probabilities {
                    let pr = &mut out.prob[z * plane..(z + 1) * plane];
                    for (p, &v) in pr.iter_mut().zip(&m.logits) {
                        *p = p.max(1.0 / (1.0 + (-v).exp()));
                    }
                }
            }
        }
        out.slices = (0..nz).filter(|&z| touched[z]).collect();
        Ok((out, emb.encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_box_grows_and_clamps() {
        let (nx, ny) = (8, 6);
        let mut l = vec![-1f32; nx * ny];
        assert_eq!(mask_box(&l, nx, ny, 2.0), None);
        l[2 * nx + 1] = 1.0;
        l[3 * nx + 4] = 1.0;
        assert_eq!(mask_box(&l, nx, ny, 0.0), Some([1.0, 2.0, 4.0, 3.0]));
        assert_eq!(mask_box(&l, nx, ny, 2.0), Some([0.0, 0.0, 6.0, 5.0]));
    }

    #[test]
    fn seeds_from_boxes_and_points() {
        let dims = [10, 10, 9];
        let o = Object {
            bbox: Some([1.0, 1.0, 2.0, 5.0, 5.0, 7.0]),
            ..Default::default()
        };
        let s = seed_of("c", 0, &o, dims).unwrap();
        assert_eq!((s.z, s.range), (4, Some((2, 7))));
        let o = Object {
            bbox: Some([1.0, 1.0, 3.0, 5.0, 5.0, 3.0]),
            ..Default::default()
        };
        let s = seed_of("c", 0, &o, dims).unwrap();
        assert_eq!((s.z, s.range), (3, None));
        let o = Object {
            points: vec![[2.0, 2.0, 6.0, 1.0], [3.0, 2.0, 6.0, 0.0]],
            ..Default::default()
        };
        let s = seed_of("c", 0, &o, dims).unwrap();
        assert_eq!((s.z, s.points.len(), s.bbox), (6, 2, None));
        let o = Object {
            points: vec![[2.0, 2.0, 6.0, 1.0], [3.0, 2.0, 5.0, 1.0]],
            ..Default::default()
        };
        let e = seed_of("c", 1, &o, dims).unwrap_err().to_string();
        assert!(e.contains("object 1") && e.contains("one slice"), "{e}");
        let o = Object {
            bbox: Some([1.0, 1.0, 2.0, 5.0, 5.0, 6.0]),
            points: vec![[2.0, 2.0, 4.0, 1.0], [3.0, 2.0, 5.0, 1.0]],
            ..Default::default()
        };
        let e = seed_of("c", 0, &o, dims).unwrap_err().to_string();
        assert!(e.contains("slice 5") && e.contains("interactions"), "{e}");
    }
}
