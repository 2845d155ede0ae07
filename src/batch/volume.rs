//! One NIfTI volume case: per-slice prompts from 3D points, boxes or a label volume, chunked
//! encoding along the third axis (with the depth branch), and the label, probability and
//! overview outputs on the input's own grid.

use crate::backend::Backend;
use crate::data::nifti;
use crate::error::{Error, Result};
use crate::metrics;
use crate::pipeline::{self, Prepared, RgbImage};
use crate::sam::{DepthSpec, Trace};
use crate::tensor::Tensor;

use super::cases::{Case, FromLabel, Object};
use super::files::{sibling, write_overview};
use super::job::{check_finite_pixels, check_finite_values, check_object_count, Job};
use super::prompts::{check_inside, label_prompt, object_prompts, Obj2d};
use super::propagate::VolumeMasks;
use super::report::Outcome;

impl<B: Backend> Job<'_, B> {
    pub(super) fn run_volume(&self, case: &Case) -> Result<Outcome> {
        let vol = nifti::read_nifti(&case.image)?;
        check_finite_pixels(&case.image, &vol.data)?;
        let [nx, ny, nz] = vol.dims;
        let mut data = vol.data;
        self.opts.intensity.apply(&mut data);
        let objects = self.objects_of(case);
        let label_rule = self.label_rule_of(case);
        let (masks, encoded) =
            self.volume_masks(&case.name, &data, vol.dims, &objects, label_rule)?;
        let VolumeMasks {
            labels,
            prob,
            slices,
            ..
        } = masks;
        let gt = match self.gt_of(case) {
            Some(p) => {
                let g = nifti::read_nifti(&p)?;
                if g.dims != vol.dims {
                    return Err(Error::Input(format!(
                        "{}: ground truth {} has dims {:?}, the volume {:?}",
                        case.name,
                        p.display(),
                        g.dims,
                        vol.dims
                    )));
                }
                Some(
                    g.data
                        .iter()
                        .map(|&v| {
                            self.opts
                                .label_id
                                .map_or(v > 0.5, |id| v.round() == id as f32)
                        })
                        .collect::<Vec<bool>>(),
                )
            }
            None => None,
        };
        nifti::write_labels(&case.output, &vol.header, &labels)?;
        if self.opts.probabilities {
            let ext = if case.output.to_string_lossy().ends_with(".gz") {
                ".nii.gz"
            } else {
                ".nii"
            };
            nifti::write_f32(&sibling(&case.output, "_prob", ext), &vol.header, &prob)?;
        }
        if self.opts.overview {
            write_overview(
                &sibling(&case.output, "_overview", ".png"),
                &data,
                &labels,
                [nx, ny, nz],
                &slices,
            )?;
        }
        let scores = match gt {
            Some(g) => {
                let sp = vol.header.spacing();
                let pred: Vec<bool> = labels.iter().map(|&v| v > 0).collect();
                Some(metrics::scores(
                    &pred,
                    &g,
                    &[nz, ny, nx],
                    &[sp[2], sp[1], sp[0]],
                )?)
            }
            None => None,
        };
        Ok(Outcome::Done {
            images: encoded,
            scores,
        })
    }

    /// Segments a volume held in memory, as a batch run segments a NIfTI file: `data` holds the
    /// raw intensities x fastest (`[nz][ny][nx]`, the order of a NIfTI file's array), `dims` is
    /// `[nx, ny, nz]`, and object k (voxel-index prompts, as in a manifest) becomes label k + 1.
    /// The job's intensity mapping, volume preset, chunking and propagation apply. `name` names
    /// the volume in errors.
    pub fn segment_volume(
        &self,
        name: &str,
        mut data: Vec<f32>,
        dims: [usize; 3],
        objects: &[Object],
    ) -> Result<VolumeMasks> {
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if dims.contains(&0) || n != Some(data.len()) {
            return Err(Error::Input(format!(
                "{name}: a volume of dims {dims:?} needs {} values, got {}",
                n.map_or("too many".to_string(), |n| n.to_string()),
                data.len()
            )));
        }
        crate::limits::current().check_voxels(std::path::Path::new(name), dims)?;
        check_finite_values(name, &data)?;
        self.opts.intensity.apply(&mut data);
        let masks = self.volume_masks(name, &data, dims, objects, None)?.0;
        // Chunks no prompt reaches are never encoded: the run ends short of nz slices.
        if let Some(f) = self.progress {
            f(dims[2], dims[2]);
        }
        Ok(masks)
    }

    /// The masks of a volume whose intensities are mapped: propagated from the objects' seeds,
    /// or (without propagation) on the prompted slices only; also the slices encoded.
    fn volume_masks(
        &self,
        name: &str,
        data: &[f32],
        dims: [usize; 3],
        objects: &[Object],
        label_rule: Option<FromLabel>,
    ) -> Result<(VolumeMasks, usize)> {
        check_object_count(name, objects.len() + usize::from(label_rule.is_some()))?;
        self.encoded.store(0, std::sync::atomic::Ordering::Relaxed);
        match &self.opts.propagate {
            Some(rule) => {
                if label_rule.is_some() {
                    return Err(Error::Input(format!(
                        "{name}: --propagate segments from the given prompts; prompts from a label \
                         (--prompt-from-label, \"from_label\") are for evaluation without it"
                    )));
                }
                self.propagate_volume(name, data, dims, objects, rule)
            }
            None => {
                if objects.iter().any(|o| !o.interactions.is_empty()) {
                    return Err(Error::Input(format!(
                        "{name}: interactions refine a propagated mask: run with --propagate"
                    )));
                }
                self.segment_prompted_slices(name, data, dims, objects, label_rule)
            }
        }
    }

    /// Today's rule without propagation: every slice with a prompt (from the objects' 3D
    /// points and boxes, or the label rule) is decoded; the others stay background. Returns the
    /// label map, the probabilities, the prompted slices and the slices encoded.
    fn segment_prompted_slices(
        &self,
        name: &str,
        data: &[f32],
        dims: [usize; 3],
        objects: &[Object],
        label_rule: Option<FromLabel>,
    ) -> Result<(VolumeMasks, usize)> {
        let [nx, ny, nz] = dims;
        // Per-slice objects: (output label id, (points (x, y, label), 2D box)). The id is the
        // object's, not its place on the slice: objects need not share slices.
        type SliceObjs = Vec<(u8, Obj2d)>;
        let mut per_slice: Vec<SliceObjs> = vec![Vec::new(); nz];
        for (k, o) in objects.iter().enumerate() {
            let mut slices: std::collections::BTreeMap<usize, Obj2d> = Default::default();
            for p in &o.points {
                check_inside(name, &format!("object {k} point"), p[0], p[1], nx, ny)?;
                let z = p[2].round();
                if !(z >= 0.0 && z < nz as f32) {
                    return Err(Error::Input(format!(
                        "{}: object {k} point z = {} is outside 0..{}",
                        name,
                        p[2],
                        nz - 1
                    )));
                }
                if p[3] != 0.0 && p[3] != 1.0 {
                    return Err(Error::Input(format!(
                        "{}: object {k}: point label {} is not 0 or 1",
                        name, p[3]
                    )));
                }
                slices
                    .entry(z as usize)
                    .or_default()
                    .0
                    .push([p[0], p[1], p[3]]);
            }
            if let Some(b) = o.bbox {
                check_inside(name, &format!("object {k} box corner"), b[0], b[1], nx, ny)?;
                check_inside(name, &format!("object {k} box corner"), b[3], b[4], nx, ny)?;
                let (z0, z1) = (b[2].round(), b[5].round());
                if b[3] < b[0] || b[4] < b[1] || z1 < z0 || z0 < 0.0 || z1 >= nz as f32 {
                    return Err(Error::Input(format!(
                        "{}: object {k}: box {b:?} needs x0 <= x1, y0 <= y1 and 0 <= z0 <= z1 < {nz}",
                        name
                    )));
                }
                for z in z0 as usize..=z1 as usize {
                    slices.entry(z).or_default().1 = Some([b[0], b[1], b[3], b[4]]);
                }
            }
            for (z, obj) in slices {
                per_slice[z].push((k as u8 + 1, obj));
            }
        }
        let label_obj_id = objects.len() as u8 + 1;
        if let Some(fl) = label_rule {
            let lab = nifti::read_nifti(&fl.path)?;
            if lab.dims != dims {
                return Err(Error::Input(format!(
                    "{}: label {} has dims {:?}, the volume {:?}",
                    name,
                    fl.path.display(),
                    lab.dims,
                    dims
                )));
            }
            for (z, slot) in per_slice.iter_mut().enumerate() {
                let plane: Vec<u32> = lab.data[z * nx * ny..(z + 1) * nx * ny]
                    .iter()
                    .map(|v| v.round().max(0.0) as u32)
                    .collect();
                if let Some((b, c)) = label_prompt(&plane, ny, nx, fl.id) {
                    slot.push((
                        label_obj_id,
                        (
                            if fl.click {
                                vec![[c[0], c[1], 1.0]]
                            } else {
                                vec![]
                            },
                            Some(b),
                        ),
                    ));
                }
            }
        }
        if per_slice.iter().all(|s| s.is_empty()) {
            return Err(Error::Input(format!("{}: no prompt on any slice", name)));
        }
        let mut labels = vec![0u8; nx * ny * nz];
        let mut prob = vec![
            0f32;
            if self.opts.probabilities {
                nx * ny * nz
            } else {
                0
            }
        ];
        let mut encoded = 0;
        for k0 in (0..nz).step_by(self.opts.chunk) {
            let d = self.opts.chunk.min(nz - k0);
            if per_slice[k0..k0 + d].iter().all(|s| s.is_empty()) {
                continue;
            }
            let (emb, preps) = self.encode_chunk(data, [nx, ny, nz], k0, d)?;
            encoded += d;
            for (b, z) in (k0..k0 + d).enumerate() {
                if per_slice[z].is_empty() {
                    continue;
                }
                let (ids, objs): (Vec<u8>, Vec<Obj2d>) = per_slice[z].iter().cloned().unzip();
                let prompts = object_prompts(&objs, &preps[b])?;
                let (lab, pr) = self.decode(&emb, b, &preps[b], &prompts, &ids)?;
                labels[z * nx * ny..(z + 1) * nx * ny].copy_from_slice(&lab);
                if self.opts.probabilities {
                    prob[z * nx * ny..(z + 1) * nx * ny].copy_from_slice(&pr);
                }
            }
        }
        let slices: Vec<usize> = (0..nz).filter(|&z| !per_slice[z].is_empty()).collect();
        Ok((
            VolumeMasks {
                labels,
                prob,
                slices,
            },
            encoded,
        ))
    }

    /// One encoder pass over slices `k0..k0 + d` of a volume (intensities already mapped), the
    /// SD-Trans depth branch across them when the model has one: the embeddings and each
    /// slice's preprocessing.
    pub(super) fn encode_chunk(
        &self,
        data: &[f32],
        dims: [usize; 3],
        k0: usize,
        d: usize,
    ) -> Result<(B::Tensor, Vec<Prepared>)> {
        let be = self.be;
        let [nx, ny, _] = dims;
        let mut preps = Vec::with_capacity(d);
        let mut batch = Vec::with_capacity(d * 3 * self.size * self.size);
        for z in k0..k0 + d {
            let plane = &data[z * nx * ny..(z + 1) * nx * ny];
            let img = RgbImage {
                height: ny,
                width: nx,
                data: plane.iter().flat_map(|&v| [v * 255.0; 3]).collect(),
            };
            let prep = pipeline::prepare(&img, self.size, self.opts.volume_preset)?;
            batch.extend_from_slice(prep.tensor.data());
            preps.push(prep);
        }
        let x = be.upload(&Tensor::from_vec(batch, &[d, 3, self.size, self.size])?)?;
        let depth = (self.model.config.has_depth_branch() && d > 1).then_some(DepthSpec {
            d,
            mode: self.opts.depth_mode,
        });
        let emb = self.model.encode(be, &x, depth, &mut Trace::off())?;
        self.encoded_slices(d, dims[2]);
        Ok((emb, preps))
    }
}
