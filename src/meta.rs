//! How a model is to be fed and run, as a checkpoint records it: the preprocessing it was trained
//! with, the label it segments, its decoder flavour and depth mode.
//!
//! Adapter checkpoints (`train::checkpoint`) carry this in their own schema; a merged model keeps
//! the same facts as plain metadata keys of its safetensors file, so that a standalone model is
//! run the way it was trained (a model trained on MR intensities never silently gets the CT
//! window). Every key is optional and an empty value means absent:
//!
//! | key | value |
//! |---|---|
//! | `preset` | `medsa`, `sam` (SPEC section 5) or `litemedsam` (SPEC section 8) |
//! | `model_size` | model input size S |
//! | `intensity` | volume intensities (`window:lo,hi`, `mr:plo,phi`, `none`) |
//! | `num_classes` | mask outputs used as classes (1: SAM's single mask) |
//! | `label_id` | the label id the model was trained to segment |
//! | `depth` | slices per chunk through the depth branch |
//! | `depth_mode` | `per-token` or `compat` (SPEC section 3) |
//! | `decoder_flavour` | `sam` or `medsa` (SPEC section 7) |

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::batch::Intensity;
use crate::error::{Error, Result};
use crate::medsa::depth_branch::DepthMode;
use crate::pipeline::Preset;
use crate::sam::DecoderFlavour;
use crate::train::checkpoint::{intensity_name, preset_name, AdapterMeta};
use crate::weights::SafetensorsFile;

/// What a checkpoint says about running its model; `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMeta {
    /// 2D / slice preprocessing preset.
    pub preset: Option<Preset>,
    /// Model input size S.
    pub model_size: Option<usize>,
    /// Volume intensities.
    pub intensity: Option<Intensity>,
    /// Classes (mask outputs 0..N-1).
    pub num_classes: Option<usize>,
    /// The label id the model segments.
    pub label_id: Option<u32>,
    /// Slices per depth chunk.
    pub depth: Option<usize>,
    /// Depth-branch semantics.
    pub depth_mode: Option<DepthMode>,
    /// Decoder flavour.
    pub decoder_flavour: Option<DecoderFlavour>,
}

/// The metadata name of a depth mode.
pub fn depth_mode_name(m: DepthMode) -> &'static str {
    match m {
        DepthMode::PerToken => "per-token",
        DepthMode::Compat => "compat",
    }
}

fn bad(path: &Path, key: &str, v: &str, what: &str) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: format!("metadata `{key}` = \"{v}\": expected {what}"),
    }
}

impl ModelMeta {
    /// Reads the keys of the module table from a metadata map; errors name the file, the key,
    /// the value and what was expected.
    pub fn from_metadata(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| m.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(bad(path, k, v, "a positive integer")),
                })
                .transpose()
        };
        Ok(ModelMeta {
            preset: get("preset")
                .map(|v| match v {
                    "medsa" => Ok(Preset::Medsa),
                    "sam" => Ok(Preset::Sam),
                    "litemedsam" => Ok(Preset::LiteMedsam),
                    _ => Err(bad(
                        path,
                        "preset",
                        v,
                        "\"medsa\", \"sam\" or \"litemedsam\"",
                    )),
                })
                .transpose()?,
            model_size: num("model_size")?,
            intensity: get("intensity")
                .map(|v| {
                    Intensity::parse(v).map_err(|e| Error::Format {
                        path: path.to_path_buf(),
                        msg: format!("metadata `intensity`: {e}"),
                    })
                })
                .transpose()?,
            num_classes: num("num_classes")?,
            label_id: get("label_id")
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(path, "label_id", v, "a label id"))
                })
                .transpose()?,
            depth: num("depth")?,
            depth_mode: get("depth_mode")
                .map(|v| match v {
                    "per-token" => Ok(DepthMode::PerToken),
                    "compat" => Ok(DepthMode::Compat),
                    _ => Err(bad(path, "depth_mode", v, "\"per-token\" or \"compat\"")),
                })
                .transpose()?,
            decoder_flavour: get("decoder_flavour")
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(path, "decoder_flavour", v, "\"sam\" or \"medsa\""))
                })
                .transpose()?,
        })
    }

    /// The metadata of a model checkpoint file (empty for files without any).
    pub fn of_checkpoint(path: &Path) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        Self::from_metadata(path, f.metadata())
    }

    /// What an adapter checkpoint records (its schema's fields, its extra keys and the decoder
    /// flavour of its stored configuration).
    pub fn of_adapter(path: &Path, a: &AdapterMeta) -> Result<Self> {
        let extra: HashMap<String, String> = a.extra.clone().into_iter().collect();
        let from_extra = Self::from_metadata(path, &extra)?;
        Ok(ModelMeta {
            preset: Some(a.preset),
            model_size: Some(a.model_size),
            intensity: a.intensity,
            num_classes: Some(a.num_classes),
            decoder_flavour: Some(
                from_extra
                    .decoder_flavour
                    .unwrap_or(a.config.decoder_flavour),
            ),
            ..from_extra
        })
    }

    /// The keys of the module table for the values present.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("preset", self.preset.map(|p| preset_name(p).to_string()));
        put("model_size", self.model_size.map(|v| v.to_string()));
        put("intensity", self.intensity.map(intensity_name));
        put("num_classes", self.num_classes.map(|v| v.to_string()));
        put("label_id", self.label_id.map(|v| v.to_string()));
        put("depth", self.depth.map(|v| v.to_string()));
        put(
            "depth_mode",
            self.depth_mode.map(|v| depth_mode_name(v).to_string()),
        );
        put(
            "decoder_flavour",
            self.decoder_flavour.map(|f| f.name().to_string()),
        );
        m
    }

    /// The depth mode to run: the recorded one, else what the decoder flavour implies (a
    /// checkpoint from the public Med-SA code was trained with its regrouping, SPEC section 3).
    pub fn depth_mode_or(&self, flavour: DecoderFlavour) -> DepthMode {
        self.depth_mode.unwrap_or(match flavour {
            DecoderFlavour::Medsa => DepthMode::Compat,
            DecoderFlavour::Sam => DepthMode::PerToken,
        })
    }
}

/// The preprocessing a model's architecture implies when its metadata names none: LiteMedSAM
/// (a TinyViT with the 1x1 stem) was trained with its authors' pipeline (SPEC section 8), so
/// feeding it anything else is a silent accuracy loss; other encoders imply nothing.
pub fn architecture_preset(cfg: &crate::sam::SamConfig) -> Option<Preset> {
    match &cfg.tiny_vit {
        Some(t) if t.patch_embed == crate::sam::config::PatchEmbedKind::Pointwise => {
            Some(Preset::LiteMedsam)
        }
        _ => None,
    }
}

/// [`architecture_preset`] of the checkpoint at `path` (`None` if it cannot be read as one; the
/// load that follows reports why).
pub fn architecture_preset_of(path: &Path) -> Option<Preset> {
    let ws = crate::weights::WeightStore::open(path).ok()?;
    architecture_preset(&crate::sam::SamConfig::infer(&ws).ok()?)
}
