//! [`Model`]: a loaded model on its device with host-array entry points.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, RunOptions};
use crate::batch::{Intensity, Job, JobOptions, Object, Propagation, VolumeMasks};
use crate::error::{Error, Result};
use crate::medsa::depth_branch::DepthMode;
use crate::meta::ModelMeta;
use crate::pipeline::{Preset, RgbImage};
use crate::sam::model::postprocess_masks;
use crate::sam::{DepthSpec, MaskOutput, Prompts, Sam, Trace};
use crate::tensor::Tensor;

use super::{Device, ModelDefaults, ModelSource};

#[allow(clippy::large_enum_variant)] // one value per model
enum Loaded {
    Cpu(Cpu, Sam<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::Cuda, Sam<crate::backend::cuda::Cuda>),
}

enum EmbData {
    Cpu(Tensor),
    #[cfg(feature = "cuda")]
    Cuda(<crate::backend::cuda::Cuda as Backend>::Tensor),
}

/// Runs a generic body with the backend and model a [`Model`] holds.
macro_rules! with_sam {
    ($model:expr, $be:ident, $sam:ident => $body:expr) => {
        match &$model.dev {
            Loaded::Cpu($be, $sam) => $body,
            #[cfg(feature = "cuda")]
            Loaded::Cuda($be, $sam) => $body,
        }
    };
}

/// Distinguishes models so that embeddings are never decoded by a model that did not make them.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A checkpoint (and adapter) loaded on a device.
pub struct Model {
    dev: Loaded,
    id: u64,
    source: ModelSource,
    meta: ModelMeta,
    defaults: ModelDefaults,
    note: Option<String>,
    precision: String,
}

/// Image embeddings from [`Model::embed`], kept on the model's device.
pub struct Embeddings {
    model: u64,
    data: EmbData,
    shape: [usize; 4],
    input_hw: (usize, usize),
}

/// What [`Model::decode`] returns (host tensors): SAM's three outputs.
pub struct Decoded {
    /// `[B, M, H0, W0]` mask logits at the original size (threshold at 0).
    pub masks: Tensor,
    /// `[B, M]` predicted IoU of each mask.
    pub iou_predictions: Tensor,
    /// `[B, M, 4h, 4w]` low-resolution logits (a next prompt's `mask_input`).
    pub low_res_masks: Tensor,
}

/// Options of [`Model::segment_image`] and [`Model::segment_volume`]; `None` takes the model's
/// default ([`ModelDefaults`]), as the command line does.
#[derive(Clone, Debug, Default)]
pub struct SegmentOptions {
    /// 2D preprocessing.
    pub preset: Option<Preset>,
    /// Volume slice preprocessing.
    pub volume_preset: Option<Preset>,
    /// Volume intensity mapping.
    pub intensity: Option<Intensity>,
    /// Depth-branch semantics.
    pub depth_mode: Option<DepthMode>,
    /// Slices per encoder pass (0: the command line's default, 8).
    pub chunk: usize,
    /// Three masks per prompt, keep the one with the best predicted IoU.
    pub multimask: bool,
    /// Propagate each object from one prompted slice through the volume.
    pub propagate: Option<Propagation>,
    /// Also compute the per-voxel maximum probability.
    pub probabilities: bool,
}

impl Embeddings {
    /// `[B, C, h, w]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The model input size the images had.
    pub fn input_hw(&self) -> (usize, usize) {
        self.input_hw
    }
}

impl Model {
    /// Loads `source` onto `device` (`cpu`, `cuda`, `cuda:N`) at `precision` (`f32`, `bf16`).
    pub fn open(
        source: ModelSource,
        device: &str,
        precision: &str,
        opts: &RunOptions,
    ) -> Result<Model> {
        let meta = source.meta()?;
        let (dev, note, flavour) = match Device::open(device, precision, opts)? {
            Device::Cpu(be) => {
                let (sam, note) = source.open_on(&be, &meta)?;
                let f = sam.config.decoder_flavour;
                (Loaded::Cpu(be, sam), note, f)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(be) => {
                let (sam, note) = source.open_on(&be, &meta)?;
                let f = sam.config.decoder_flavour;
                (Loaded::Cuda(be, sam), note, f)
            }
        };
        let defaults = ModelDefaults::of(&source, &meta, flavour)?;
        Ok(Model {
            dev,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            source,
            meta,
            defaults,
            note,
            precision: precision.to_string(),
        })
    }

    /// The defaults its metadata gives.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// The native input size `(H, W)`.
    pub fn image_size(&self) -> (usize, usize) {
        with_sam!(self, _be, sam => sam.config.img_size())
    }

    /// The backend's description.
    pub fn device_name(&self) -> String {
        with_sam!(self, be, _sam => be.name())
    }

    /// What was loaded and how it will be fed, as a JSON object.
    pub fn info(&self) -> serde_json::Value {
        use crate::train::checkpoint::{intensity_name, preset_name};
        let d = &self.defaults;
        let (cfg_variant, img, grid, out_chans, tokens, depth, dec_adapters, flavour) = with_sam!(self, _be, sam => {
            let c = &sam.config;
            let (h, w) = c.img_size();
            (
                c.variant(),
                (h, w),
                (h / c.patch, w / c.patch),
                c.out_chans,
                c.num_mask_tokens,
                c.has_depth_branch(),
                c.has_decoder_adapters(),
                format!("{:?}", c.decoder_flavour).to_lowercase(),
            )
        });
        serde_json::json!({
            "checkpoint": self.source.checkpoint.display().to_string(),
            "adapter": self.source.adapter.as_ref().map(|a| a.display().to_string()),
            "adapter_note": self.note,
            "device": self.device_name(),
            "precision": self.precision,
            "variant": cfg_variant,
            "image_size": [img.0, img.1],
            "embedding_shape": [out_chans, grid.0, grid.1],
            "mask_tokens": tokens,
            "depth_branch": depth,
            "decoder_adapters": dec_adapters,
            "decoder_flavour": flavour,
            "preset": preset_name(d.preset),
            "volume_preset": preset_name(d.volume_preset),
            "preset_source": d.preset_source,
            "intensity": intensity_name(d.intensity),
            "depth_mode": crate::meta::depth_mode_name(d.depth_mode),
            "label_id": d.label_id,
            "classes": self.meta.num_classes,
        })
    }

    /// Encodes preprocessed images `[B, 3, H, W]` (row-major `images`); with `depth`, every `d`
    /// consecutive images are one volume chunk for the SD-Trans depth branch, attending as
    /// `mode` says (default: the model's, [`ModelDefaults::depth_mode`]).
    pub fn embed(
        &self,
        images: &[f32],
        shape: [usize; 4],
        depth: Option<usize>,
        mode: Option<DepthMode>,
    ) -> Result<Embeddings> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if shape[1] != 3 || shape.contains(&0) || n != Some(images.len()) {
            return Err(Error::Input(format!(
                "images: shape {shape:?} with {} values: expected [B, 3, H, W] with B*3*H*W values",
                images.len()
            )));
        }
        if let Some(i) = images.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "images: value {} at flat index {i} is not finite",
                images[i]
            )));
        }
        let x = Tensor::from_vec(images.to_vec(), &shape)?;
        let depth = match depth {
            None | Some(0) => None,
            Some(d) if !shape[0].is_multiple_of(d) => {
                return Err(Error::Input(format!(
                    "images: batch {} is not a whole number of volume chunks of depth {d}",
                    shape[0]
                )))
            }
            Some(d) => Some(DepthSpec {
                d,
                mode: mode.unwrap_or(self.defaults.depth_mode),
            }),
        };
        let (data, s) = match &self.dev {
            Loaded::Cpu(be, sam) => {
                // The CPU backend's tensors are host tensors: `x` is already one (its upload
                // would be a second copy of the images).
                let e = sam.encode(be, &x, depth, &mut Trace::off())?;
                let s = be.dims(&e).to_vec();
                (EmbData::Cpu(e), s)
            }
            #[cfg(feature = "cuda")]
            Loaded::Cuda(be, sam) => {
                let e = sam.encode(be, &be.upload(&x)?, depth, &mut Trace::off())?;
                let s = be.dims(&e).to_vec();
                (EmbData::Cuda(e), s)
            }
        };
        Ok(Embeddings {
            model: self.id,
            data,
            shape: [s[0], s[1], s[2], s[3]],
            input_hw: (shape[2], shape[3]),
        })
    }

    /// The embeddings as a host tensor `[B, C, h, w]`.
    pub fn download(&self, emb: &Embeddings) -> Result<Tensor> {
        self.check_own(emb)?;
        match (&self.dev, &emb.data) {
            (Loaded::Cpu(_, _), EmbData::Cpu(t)) => Ok(t.clone()),
            #[cfg(feature = "cuda")]
            (Loaded::Cuda(be, _), EmbData::Cuda(t)) => be.download(t),
            #[cfg(feature = "cuda")]
            _ => unreachable!("embeddings are checked to be this model's"),
        }
    }

    /// Image `index` of a batch of embeddings, as the embeddings of that one image.
    pub fn select(&self, emb: &Embeddings, index: usize) -> Result<Embeddings> {
        self.check_own(emb)?;
        if index >= emb.shape[0] {
            return Err(Error::Input(format!(
                "embeddings: index {index} of a batch of {}",
                emb.shape[0]
            )));
        }
        let data = match (&self.dev, &emb.data) {
            (Loaded::Cpu(be, _), EmbData::Cpu(t)) => EmbData::Cpu(be.index_select0(t, &[index])?),
            #[cfg(feature = "cuda")]
            (Loaded::Cuda(be, _), EmbData::Cuda(t)) => {
                EmbData::Cuda(be.index_select0(t, &[index])?)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("embeddings are checked to be this model's"),
        };
        Ok(Embeddings {
            model: self.id,
            data,
            shape: [1, emb.shape[1], emb.shape[2], emb.shape[3]],
            input_hw: emb.input_hw,
        })
    }

    fn check_own(&self, emb: &Embeddings) -> Result<()> {
        if emb.model != self.id {
            return Err(Error::Input(
                "embeddings: they were made by another model; decode them with the model that embedded them".into(),
            ));
        }
        Ok(())
    }

    /// Decodes `prompts` (model-input pixel coordinates; sample b against embedding b) and
    /// returns SAM's outputs, the masks resampled as SAM's `postprocess_masks` does: from the
    /// model input, cropped to `input_size` (default: the whole input) and resized to
    /// `original_size` (default: the input size), exactly as `medsa-engine forward` does.
    pub fn decode(
        &self,
        emb: &Embeddings,
        prompts: &Prompts,
        output: MaskOutput,
        input_size: Option<(usize, usize)>,
        original_size: Option<(usize, usize)>,
    ) -> Result<Decoded> {
        self.check_own(emb)?;
        let hw = emb.input_hw;
        let input_size = input_size.unwrap_or(hw);
        let original_size = original_size.unwrap_or(input_size);
        fn run<B: Backend>(
            be: &B,
            sam: &Sam<B>,
            e: &B::Tensor,
            hw: (usize, usize),
            prompts: &Prompts,
            output: MaskOutput,
            sizes: ((usize, usize), (usize, usize)),
        ) -> Result<Decoded> {
            let (low, iou) = sam.decode(be, e, hw, prompts, output, &mut Trace::off())?;
            let masks = postprocess_masks(be, &low, hw, sizes.0, sizes.1)?;
            Ok(Decoded {
                masks: be.download(&masks)?,
                iou_predictions: be.download(&iou)?,
                low_res_masks: be.download(&low)?,
            })
        }
        let sizes = (input_size, original_size);
        match (&self.dev, &emb.data) {
            (Loaded::Cpu(be, sam), EmbData::Cpu(e)) => run(be, sam, e, hw, prompts, output, sizes),
            #[cfg(feature = "cuda")]
            (Loaded::Cuda(be, sam), EmbData::Cuda(e)) => {
                run(be, sam, e, hw, prompts, output, sizes)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("embeddings are checked to be this model's"),
        }
    }

    fn job_options(&self, o: &SegmentOptions) -> JobOptions {
        let d = &self.defaults;
        JobOptions {
            preset: o.preset.unwrap_or(d.preset),
            volume_preset: o.volume_preset.unwrap_or(d.volume_preset),
            intensity: o.intensity.unwrap_or(d.intensity),
            chunk: if o.chunk == 0 { 8 } else { o.chunk },
            depth_mode: o.depth_mode.unwrap_or(d.depth_mode),
            batch_size: 1,
            skip_existing: false,
            multimask: o.multimask,
            probabilities: o.probabilities,
            overview: false,
            global_objects: Vec::new(),
            global_from_label: None,
            labels: None,
            label_id: None,
            quiet: true,
            out_dir: std::path::PathBuf::new(),
            propagate: o.propagate,
        }
    }

    /// Segments an image (RGB on 0..255) with `objects` in pixel coordinates of the image as
    /// given: the label map (object k is label k + 1) and per-pixel maximum probability, both
    /// `height * width`.
    pub fn segment_image(
        &self,
        image: &RgbImage,
        objects: &[Object],
        opts: &SegmentOptions,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let jo = self.job_options(opts);
        with_sam!(self, be, sam => Job::new(be, sam, jo)?.segment_image("image", image, objects))
    }

    /// Segments a volume: `data` x fastest (`[nz][ny][nx]`), `dims` `[nx, ny, nz]`, `objects` in
    /// voxel indices; `progress` is told `(slices encoded, nz)` after every encoder pass.
    pub fn segment_volume(
        &self,
        data: Vec<f32>,
        dims: [usize; 3],
        objects: &[Object],
        opts: &SegmentOptions,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<VolumeMasks> {
        let jo = self.job_options(opts);
        with_sam!(self, be, sam => {
            let mut job = Job::new(be, sam, jo)?;
            if let Some(f) = progress {
                job = job.with_progress(f);
            }
            job.segment_volume("volume", data, dims, objects)
        })
    }
}

impl SegmentOptions {
    /// Reads options from a JSON object, the form the Python package and the C ABI pass:
    /// `{"preset": "sam"|"medsa"|"litemedsam", "volume_preset": ..., "intensity": "ct"|"mr"|
    /// "window:a,b"|..., "depth_mode": "compat"|"per_token", "chunk": n, "multimask": bool,
    /// "probabilities": bool, "propagate": bool or {"margin", "min_area", "min_iou",
    /// "min_stability", "max_slices", "mask_input"}}`; absent fields keep the model's
    /// defaults. Unknown fields are refused, so a misspelt option is never silently ignored.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |m: String| Error::Input(format!("segment options: {m}"));
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let mut o = SegmentOptions::default();
        let preset = |k: &str, x: &serde_json::Value| -> Result<Preset> {
            match x.as_str() {
                Some("sam") => Ok(Preset::Sam),
                Some("medsa") => Ok(Preset::Medsa),
                Some("litemedsam") => Ok(Preset::LiteMedsam),
                _ => Err(bad(format!(
                    "`{k}` is {x}: expected \"sam\", \"medsa\" or \"litemedsam\""
                ))),
            }
        };
        let flag = |k: &str, x: &serde_json::Value| -> Result<bool> {
            x.as_bool()
                .ok_or_else(|| bad(format!("`{k}` is {x}: expected true or false")))
        };
        let whole = |k: &str, x: &serde_json::Value| -> Result<usize> {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("`{k}` is {x}: expected a whole number")))
        };
        let real = |k: &str, x: &serde_json::Value| -> Result<f32> {
            x.as_f64()
                .map(|n| n as f32)
                .ok_or_else(|| bad(format!("`{k}` is {x}: expected a number")))
        };
        for (k, x) in obj {
            if x.is_null() {
                continue;
            }
            match k.as_str() {
                "preset" => o.preset = Some(preset(k, x)?),
                "volume_preset" => o.volume_preset = Some(preset(k, x)?),
                "intensity" => {
                    let s = x
                        .as_str()
                        .ok_or_else(|| bad(format!("`intensity` is {x}: expected a string")))?;
                    o.intensity = Some(Intensity::parse(s)?);
                }
                "depth_mode" => {
                    o.depth_mode = Some(match x.as_str() {
                        Some("compat") => DepthMode::Compat,
                        Some("per_token" | "per-token") => DepthMode::PerToken,
                        _ => {
                            return Err(bad(format!(
                                "`depth_mode` is {x}: expected \"compat\" or \"per_token\""
                            )))
                        }
                    })
                }
                "chunk" => {
                    o.chunk = whole(k, x)?;
                    if o.chunk == 0 {
                        return Err(bad("`chunk` must be at least 1".into()));
                    }
                }
                "multimask" => o.multimask = flag(k, x)?,
                "probabilities" => o.probabilities = flag(k, x)?,
                "propagate" => {
                    o.propagate = match x {
                        serde_json::Value::Bool(b) => b.then(Propagation::default),
                        serde_json::Value::Object(m) => {
                            let mut p = Propagation::default();
                            for (pk, px) in m {
                                let key = format!("propagate.{pk}");
                                match pk.as_str() {
                                    "margin" => p.margin = real(&key, px)?,
                                    "min_area" => p.min_area = whole(&key, px)?,
                                    "min_iou" => p.min_iou = real(&key, px)?,
                                    "min_stability" => p.min_stability = real(&key, px)?,
                                    "max_slices" if px.is_null() => p.max_slices = None,
                                    "max_slices" => p.max_slices = Some(whole(&key, px)?),
                                    "mask_input" => p.mask_input = flag(&key, px)?,
                                    _ => return Err(bad(format!(
                                        "unknown option `{key}` (expected margin, min_area, min_iou, min_stability, max_slices, mask_input)"
                                    ))),
                                }
                            }
                            Some(p)
                        }
                        _ => {
                            return Err(bad(format!(
                                "`propagate` is {x}: expected true, false or an object of rule fields"
                            )))
                        }
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option `{k}` (expected preset, volume_preset, intensity, depth_mode, chunk, multimask, probabilities, propagate)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_options_read_every_field_and_refuse_unknown_ones() {
        let o = SegmentOptions::from_json(
            r#"{"preset": "litemedsam", "intensity": "window:0,255", "chunk": 4,
                "multimask": true, "propagate": {"min_iou": 0.5, "max_slices": 3}}"#,
        )
        .unwrap();
        assert_eq!(o.preset, Some(Preset::LiteMedsam));
        assert_eq!(o.intensity, Some(Intensity::Window(0.0, 255.0)));
        assert_eq!(o.chunk, 4);
        assert!(o.multimask);
        let p = o.propagate.unwrap();
        assert_eq!((p.min_iou, p.max_slices), (0.5, Some(3)));
        assert_eq!(p.margin, Propagation::default().margin);
        assert!(SegmentOptions::from_json(r#"{"propagate": false}"#)
            .unwrap()
            .propagate
            .is_none());
        for (text, needle) in [
            (r#"{"multimask": 1}"#, "`multimask` is 1"),
            (r#"{"chunk": 0}"#, "at least 1"),
            (r#"{"propogate": true}"#, "unknown option `propogate`"),
            (r#"{"propagate": {"margn": 1}}"#, "propagate.margn"),
            (r#"{"preset": "ct"}"#, "expected \"sam\""),
            ("[1]", "expected a JSON object"),
            ("{", "not valid JSON"),
        ] {
            let e = SegmentOptions::from_json(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
