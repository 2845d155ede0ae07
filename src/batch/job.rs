//! The model runner of a batch job: loading and checking 2D cases (on a reader thread), encoding
//! them in batches, decoding every object's mask, writing masks and scores, and the run loop
//! that never stops on a bad case.

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::metrics;
use crate::pipeline::{self, Prepared};
use crate::sam::model::postprocess_masks;
use crate::sam::{MaskOutput, Prompts, Sam, Trace};
use crate::tensor::Tensor;

use super::cases::{is_nifti, Case, FromLabel, Object};
use super::files::{find_label, prepare_output, sibling};
use super::prompts::{check_inside, label_prompt, load_label_png, object_prompts, Obj2d};
use super::report::{Outcome, Progress, Summary};
use super::JobOptions;

/// A loaded, checked 2D case ready for the encoder.
struct Loaded2d {
    prep: Prepared,
    prompts: Vec<Prompts>,
    gt: Option<Vec<bool>>,
}

/// Refuses more objects than an 8-bit label map has ids.
pub(super) fn check_object_count(case: &str, n: usize) -> Result<()> {
    if n > super::cases::MAX_OBJECTS {
        return Err(Error::Input(format!(
            "{case}: {n} objects, but a label map holds at most {}",
            super::cases::MAX_OBJECTS
        )));
    }
    Ok(())
}

/// Refuses an image or volume with NaN or infinite values: they would poison every slice's
/// normalisation and come out as an empty mask.
pub(super) fn check_finite_pixels(path: &std::path::Path, data: &[f32]) -> Result<()> {
    check_finite_values(&path.display().to_string(), data)
}

/// [`check_finite_pixels`] for an array named `name`.
pub(super) fn check_finite_values(name: &str, data: &[f32]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::Input(format!(
            "{name}: {bad} of {} values are NaN or infinite; expected finite intensities",
            data.len()
        )));
    }
    Ok(())
}

/// The model runner for one job.
pub struct Job<'a, B: Backend> {
    pub(super) be: &'a B,
    pub(super) model: &'a Sam<B>,
    pub(super) opts: JobOptions,
    pub(super) size: usize,
    /// Told `(slices encoded, slices in the volume)` after every encoder pass of a volume.
    pub(super) progress: Option<&'a (dyn Fn(usize, usize) + Sync)>,
    /// Slices encoded so far in the current volume (for `progress`).
    pub(super) encoded: std::sync::atomic::AtomicUsize,
}

impl<'a, B: Backend> Job<'a, B> {
    /// A job on `model`; fails when the model's native input is not square.
    pub fn new(be: &'a B, model: &'a Sam<B>, opts: JobOptions) -> Result<Self> {
        let (h, w) = model.config.img_size();
        if h != w {
            return Err(Error::Input(format!(
                "segment needs a square native input, the model has {h}x{w}"
            )));
        }
        if opts.chunk == 0 || opts.batch_size == 0 {
            return Err(Error::Input(
                "--chunk and --batch-size must be at least 1".into(),
            ));
        }
        Ok(Job {
            be,
            model,
            opts,
            size: h,
            progress: None,
            encoded: Default::default(),
        })
    }

    /// Reports volume progress to `f` (`(slices encoded, slices in the volume)`, after every
    /// encoder pass): what a library caller shows, where the command line has its progress bar.
    pub fn with_progress(mut self, f: &'a (dyn Fn(usize, usize) + Sync)) -> Self {
        self.progress = Some(f);
        self
    }

    /// Counts `d` more slices of a volume of `nz` encoded and tells the progress callback.
    pub(super) fn encoded_slices(&self, d: usize, nz: usize) {
        use std::sync::atomic::Ordering;
        let done = self.encoded.fetch_add(d, Ordering::Relaxed) + d;
        if let Some(f) = self.progress {
            f(done.min(nz), nz);
        }
    }

    /// Segments one image held in memory with `objects` (object k becomes label k + 1), as a
    /// batch run segments an image file: the job's preset, multimask choice and prompt checks.
    /// `name` names the image in errors. Returns the label map and the per-pixel maximum
    /// probability, both `height * width`, row-major.
    pub fn segment_image(
        &self,
        name: &str,
        img: &pipeline::RgbImage,
        objects: &[Object],
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        crate::limits::current().check_pixels(
            std::path::Path::new(name),
            img.width as u64,
            img.height as u64,
        )?;
        check_finite_values(name, &img.data)?;
        let objs = self.objects_2d(name, objects, img.width, img.height)?;
        if objs.is_empty() {
            return Err(Error::Input(format!(
                "{name}: no prompt (give a box or points)"
            )));
        }
        check_object_count(name, objs.len())?;
        let prep = pipeline::prepare(img, self.size, self.opts.preset)?;
        let prompts = object_prompts(&objs, &prep)?;
        let x = self.be.upload(&prep.tensor)?;
        let emb = self.model.encode(self.be, &x, None, &mut Trace::off())?;
        let ids: Vec<u8> = (1..=prompts.len()).map(|k| k as u8).collect();
        self.decode(&emb, 0, &prep, &prompts, &ids)
    }

    /// Checks 2D objects against a `w x h` image: points inside with labels 0 or 1, boxes
    /// inside and ordered. Returns each object's points `(x, y, label)` and box.
    fn objects_2d(&self, name: &str, objects: &[Object], w: usize, h: usize) -> Result<Vec<Obj2d>> {
        let mut objs: Vec<Obj2d> = Vec::new();
        for (k, o) in objects.iter().enumerate() {
            let mut pts = Vec::new();
            for p in &o.points {
                check_inside(name, &format!("object {k} point"), p[0], p[1], w, h)?;
                if p[3] != 0.0 && p[3] != 1.0 {
                    return Err(Error::Input(format!(
                        "{name}: object {k}: point label {} is not 0 or 1",
                        p[3]
                    )));
                }
                pts.push([p[0], p[1], p[3]]);
            }
            let bbox = match o.bbox {
                Some(b) => {
                    for (x, y) in [(b[0], b[1]), (b[3], b[4])] {
                        check_inside(name, &format!("object {k} box corner"), x, y, w, h)?;
                    }
                    if b[3] < b[0] || b[4] < b[1] {
                        return Err(Error::Input(format!(
                            "{name}: object {k}: box needs x0 <= x1 and y0 <= y1"
                        )));
                    }
                    Some([b[0], b[1], b[3], b[4]])
                }
                None => None,
            };
            if !o.interactions.is_empty() {
                return Err(Error::Input(format!(
                    "{name}: object {k}: interactions refine a propagated volume mask; an image takes points and a box"
                )));
            }
            objs.push((pts, bbox));
        }
        Ok(objs)
    }

    pub(super) fn objects_of(&self, case: &Case) -> Vec<Object> {
        if case.objects.is_empty() {
            self.opts.global_objects.clone()
        } else {
            case.objects.clone()
        }
    }

    pub(super) fn label_rule_of(&self, case: &Case) -> Option<FromLabel> {
        case.from_label.clone().or_else(|| {
            self.opts
                .global_from_label
                .as_ref()
                .map(|(p, id, click)| FromLabel {
                    path: if p.is_dir() {
                        find_label(p, &case.image)
                    } else {
                        p.clone()
                    },
                    id: *id,
                    click: *click,
                })
        })
    }

    pub(super) fn gt_of(&self, case: &Case) -> Option<PathBuf> {
        case.ground_truth.clone().or_else(|| {
            self.opts.labels.as_ref().map(|p| {
                if p.is_dir() {
                    find_label(p, &case.image)
                } else {
                    p.clone()
                }
            })
        })
    }

    fn load_2d(&self, case: &Case) -> Result<Loaded2d> {
        let img = pipeline::load_image(&case.image)?;
        let (h, w) = (img.height, img.width);
        let mut objs = self.objects_2d(&case.name, &self.objects_of(case), w, h)?;
        if let Some(fl) = self.label_rule_of(case) {
            let (plane, lh, lw) = load_label_png(&fl.path)?;
            if (lh, lw) != (h, w) {
                return Err(Error::Input(format!(
                    "{}: label {} is {lw}x{lh}, the image is {w}x{h}",
                    case.name,
                    fl.path.display()
                )));
            }
            let (b, c) = label_prompt(&plane, h, w, fl.id).ok_or_else(|| {
                Error::Input(format!(
                    "{}: label id {} does not occur in {}",
                    case.name,
                    fl.id,
                    fl.path.display()
                ))
            })?;
            objs.push((
                if fl.click {
                    vec![[c[0], c[1], 1.0]]
                } else {
                    vec![]
                },
                Some(b),
            ));
        }
        if objs.is_empty() {
            return Err(Error::Input(format!(
                "{}: no prompt (give --point/--box, --prompt-from-label, or prompts in the manifest)",
                case.name
            )));
        }
        check_object_count(&case.name, objs.len())?;
        let prep = pipeline::prepare(&img, self.size, self.opts.preset)?;
        let prompts = object_prompts(&objs, &prep)?;
        let gt = match self.gt_of(case) {
            Some(p) => {
                let (plane, gh, gw) = load_label_png(&p)?;
                if (gh, gw) != (h, w) {
                    return Err(Error::Input(format!(
                        "{}: ground truth {} is {gw}x{gh}, the image is {w}x{h}",
                        case.name,
                        p.display()
                    )));
                }
                Some(
                    plane
                        .iter()
                        .map(|&v| self.opts.label_id.map_or(v > 0, |id| v == id))
                        .collect(),
                )
            }
            None => None,
        };
        Ok(Loaded2d { prep, prompts, gt })
    }

    /// Decodes one object's prompts against `one`, a single image's embeddings `[1, C, h, w]`:
    /// the mask logits at the original size (the mask with the best predicted IoU when
    /// multimask), its low-res logits `[1, 1, h, w]` (what a next prompt's `mask_input` takes),
    /// and its predicted IoU.
    pub(super) fn decode_logits(
        &self,
        one: &B::Tensor,
        prep: &Prepared,
        prompts: &Prompts,
    ) -> Result<(Vec<f32>, Tensor, f32)> {
        let be = self.be;
        let out = MaskOutput::from_multimask(self.opts.multimask);
        let (low, iou) = self.model.decode(
            be,
            one,
            (self.size, self.size),
            prompts,
            out,
            &mut Trace::off(),
        )?;
        let iou = be.download(&iou)?;
        let best = (0..iou.numel())
            .max_by(|&a, &b| iou.data()[a].total_cmp(&iou.data()[b]))
            .unwrap_or(0);
        let low = be.narrow(&low, 1, best, 1)?;
        let m = be.download(&postprocess_masks(
            be,
            &low,
            (self.size, self.size),
            prep.input_size,
            prep.original_size,
        )?)?;
        // A NaN anywhere (weights, image, embedding) reaches the logits: refuse to write a mask
        // made of it (NaN > 0 is false, so it would read as a clean background).
        let bad = m.data().iter().filter(|v| !v.is_finite()).count()
            + iou.data().iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::Input(format!(
                "the model produced {bad} non-finite mask logits or IoU scores (NaN/Inf in the \
                 weights, the image or its embedding); no mask written"
            )));
        }
        Ok((m.into_vec(), be.download(&low)?, iou.data()[best]))
    }

    /// Decodes every object against embedding `b` of `emb`, object `k` as label `ids[k]`;
    /// returns the label map at the original size and the per-pixel maximum probability.
    pub(super) fn decode(
        &self,
        emb: &B::Tensor,
        b: usize,
        prep: &Prepared,
        prompts: &[Prompts],
        ids: &[u8],
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let (oh, ow) = prep.original_size;
        let mut labels = vec![0u8; oh * ow];
        let mut prob = vec![0f32; oh * ow];
        // One copy of the image's embeddings for all its objects.
        let one = self.be.index_select0(emb, &[b])?;
        for (p, &id) in prompts.iter().zip(ids) {
            let (m, _, _) = self
                .decode_logits(&one, prep, p)
                .map_err(|e| Error::Input(format!("object {id}: {e}")))?;
            for (i, &v) in m.iter().enumerate() {
                if v > 0.0 {
                    labels[i] = id;
                }
                let s = 1.0 / (1.0 + (-v).exp());
                if s > prob[i] {
                    prob[i] = s;
                }
            }
        }
        Ok((labels, prob))
    }

    fn run_2d_batch(&self, batch: Vec<(Case, Loaded2d)>, summary: &mut Summary) {
        let be = self.be;
        let images: Vec<&Tensor> = batch.iter().map(|(_, l)| &l.prep.tensor).collect();
        let encoded = (|| -> Result<B::Tensor> {
            let mut data = Vec::with_capacity(images.len() * images[0].numel());
            for t in &images {
                data.extend_from_slice(t.data());
            }
            let x = be.upload(&Tensor::from_vec(
                data,
                &[images.len(), 3, self.size, self.size],
            )?)?;
            self.model.encode(be, &x, None, &mut Trace::off())
        })();
        let emb = match encoded {
            Ok(e) => e,
            Err(e) => {
                for (c, _) in batch {
                    summary
                        .cases
                        .push((c.name.clone(), Outcome::Failed(format!("encoder: {e}"))));
                }
                return;
            }
        };
        for (b, (case, l)) in batch.into_iter().enumerate() {
            let r = (|| -> Result<Outcome> {
                let ids: Vec<u8> = (1..=l.prompts.len()).map(|k| k as u8).collect();
                let (labels, prob) = self.decode(&emb, b, &l.prep, &l.prompts, &ids)?;
                let (h, w) = l.prep.original_size;
                pipeline::write_gray_png(&case.output, &labels, h, w)?;
                if self.opts.probabilities {
                    let p: Vec<u8> = prob.iter().map(|v| (v * 255.0).round() as u8).collect();
                    pipeline::write_gray_png(&sibling(&case.output, "_prob", ".png"), &p, h, w)?;
                }
                let scores = match &l.gt {
                    Some(gt) => {
                        let pred: Vec<bool> = labels.iter().map(|&v| v > 0).collect();
                        Some(metrics::scores(&pred, gt, &[h, w], &[1.0, 1.0])?)
                    }
                    None => None,
                };
                Ok(Outcome::Done { images: 1, scores })
            })();
            summary.cases.push((
                case.name.clone(),
                r.unwrap_or_else(|e| Outcome::Failed(e.to_string())),
            ));
        }
    }

    /// Runs every case; never stops on a bad case.
    pub fn run(&self, cases: Vec<Case>) -> Summary {
        let start = Instant::now();
        let mut summary = Summary::default();
        let progress = Progress::new(cases.len(), self.opts.quiet);
        let mut pending: Vec<(Case, Loaded2d)> = Vec::new();
        let mut images = 0usize;
        let total = cases.len();
        // Cases are read and preprocessed on a second thread while the model runs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Case, Option<Result<Loaded2d>>)>(
            self.opts.batch_size.max(2),
        );
        std::thread::scope(|s| {
            let opts = &self.opts;
            let loader = &*self;
            s.spawn(move || {
                for case in cases {
                    let skip = opts.skip_existing && case.output.exists();
                    let item = if skip || is_nifti(&case.image) {
                        None
                    } else {
                        Some(loader.load_2d(&case))
                    };
                    if tx.send((case, item)).is_err() {
                        break;
                    }
                }
            });
            let mut done = 0usize;
            let flush = |pending: &mut Vec<(Case, Loaded2d)>, summary: &mut Summary| {
                if !pending.is_empty() {
                    self.run_2d_batch(std::mem::take(pending), summary);
                }
            };
            for (case, item) in rx {
                if self.opts.skip_existing && case.output.exists() {
                    summary.cases.push((case.name.clone(), Outcome::Skipped));
                } else if let Err(e) = prepare_output(&self.opts.out_dir, &case.output) {
                    summary
                        .cases
                        .push((case.name.clone(), Outcome::Failed(e.to_string())));
                } else if is_nifti(&case.image) {
                    let r = self
                        .run_volume(&case)
                        .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
                    summary.cases.push((case.name.clone(), r));
                } else {
                    match item.expect("2D cases are loaded by the reader thread") {
                        Ok(l) => {
                            pending.push((case, l));
                            if pending.len() >= self.opts.batch_size {
                                flush(&mut pending, &mut summary);
                            }
                        }
                        Err(e) => summary
                            .cases
                            .push((case.name.clone(), Outcome::Failed(e.to_string()))),
                    }
                }
                done += 1;
                images = summary.images();
                progress.show(
                    done.min(total),
                    images,
                    summary.cases.last().map(|c| c.0.as_str()).unwrap_or(""),
                );
            }
            flush(&mut pending, &mut summary);
        });
        progress.finish();
        summary.seconds = start.elapsed().as_secs_f64();
        summary
    }
}
