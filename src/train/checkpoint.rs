//! Adapter checkpoints: what `medsa-engine train` saves, how inference lays it over its base
//! model, how new adapters start, and the optimiser state for resuming.
//!
//! # Adapter files
//!
//! A safetensors file (F32) with only the trained tensors (adapters, and the decoder when it is
//! trained) under their model keys, and string metadata:
//!
//! | key | value |
//! |---|---|
//! | `format` | `medsa-adapter/1` |
//! | `base_sha256` | SHA-256 of the base checkpoint file, lower-case hex |
//! | `base_file` | the base checkpoint's file name (for messages only) |
//! | `config` | the trained model's [`SamConfig`] as JSON |
//! | `trainable` | the trainable set (`adapters`, `adapters+decoder`) |
//! | `preset` | `medsa` or `sam` (SPEC section 5) |
//! | `model_size` | model input size S |
//! | `intensity` | volume intensity preset (`window:lo,hi`, `mr:plo,phi`, `none`); absent for 2D |
//! | `num_classes` | mask outputs used as classes (1: SAM's single mask) |
//! | `step` | optimiser steps taken |
//! | `loss` | the last (or validation) loss; absent if unknown |
//!
//! plus any caller keys ([`AdapterMeta::extra`]). Nothing depends on the clock or the machine,
//! and the header is written with sorted keys, so the same training gives the same bytes.
//!
//! # Base model
//!
//! An adapter is only meaningful on the weights it was trained with: [`apply_adapter`] hashes
//! the base file and refuses a different one (naming both files and hashes) unless the caller
//! explicitly allows it. Adapter tensors replace same-named base tensors (same shape required)
//! or add new keys (adapters trained onto a plain SAM checkpoint).
//!
//! # New adapters
//!
//! [`init_adapters`] adds Med-SA adapters with the keys and shapes of SPEC sections 2-4: `D_fc1`
//! and the HyP-Adpt hypernetwork like PyTorch's `nn.Linear` default (uniform in
//! `+-1/sqrt(fan_in)`, weight and bias), HyP-Adpt's LayerNorm at weight 1 / bias 0, and `D_fc2`
//! weight *and* bias at zero. Every adapter's output then is exactly 0 (no-skip adapters) or its
//! input (skip adapters), so training starts at the base model's predictions. (The reference
//! initialises `D_fc2` like `D_fc1`, so its first step starts from a perturbed model.) One
//! exception: Med-SA blocks partition windows before `norm1` (see `sam::image_encoder`), so a
//! windowed block whose token grid is not a multiple of the window has padded tokens equal to
//! `norm1.bias` instead of 0 in attention; adding encoder adapters to such a block changes its
//! output. How much depends on the share of padded tokens: in the tiny test model (a 4 x 4 grid
//! padded to 6 x 6, more than half padding) low-res logits of rms 1.7 move by up to 0.24; vit_b/l/h
//! at 1024 pad 64 to 70 (the last window row and column). When the grid is a multiple of the
//! window (896 or 448 pixels for SAM's window of 14) the start is exact, as are decoder adapters
//! and depth adapters everywhere (tests/train_data/ checks all three).
//!
//! The optimiser state for resuming: [`save_state`], [`load_state`], [`TrainState`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use crate::batch::Intensity;
use crate::error::{Error, Result};
use crate::pipeline::Preset;
use crate::sam::config::SamConfig;
use crate::sam::random::Rng;
use crate::tensor::Tensor;
pub use crate::train::config_json::{config_from_json, config_to_json};
use crate::train::sha256::sha256_file;
use crate::weights::{write_atomic, SafetensorsFile, WeightStore};

/// The `format` metadata of adapter checkpoints.
pub const ADAPTER_FORMAT: &str = "medsa-adapter/1";
/// The `format` metadata of optimiser-state files.
pub const STATE_FORMAT: &str = "medsa-train-state/1";

/// Metadata keys the adapter format owns (caller keys may not use them).
const RESERVED: [&str; 11] = [
    "format",
    "base_sha256",
    "base_file",
    "config",
    "trainable",
    "preset",
    "model_size",
    "intensity",
    "num_classes",
    "step",
    "loss",
];

/// What an adapter checkpoint records besides its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterMeta {
    /// SHA-256 (hex) of the base checkpoint file the adapters were trained on.
    pub base_sha256: String,
    /// The base checkpoint's file name (for messages).
    pub base_file: String,
    /// The trained model's configuration (base + adapters, as `SamConfig::infer` gives it).
    pub config: SamConfig,
    /// The trainable set (`adapters` or `adapters+decoder`).
    pub trainable: String,
    /// Image preprocessing preset.
    pub preset: Preset,
    /// Model input size S.
    pub model_size: usize,
    /// Volume intensity preset (`None` for 2D training).
    pub intensity: Option<Intensity>,
    /// Number of classes (mask outputs 0..N-1; 1 is SAM's single mask).
    pub num_classes: usize,
    /// Optimiser steps taken.
    pub step: u64,
    /// Loss at `step`, if known.
    pub loss: Option<f64>,
    /// Further caller metadata (label id, depth chunk, learning rate...).
    pub extra: BTreeMap<String, String>,
}

/// A preset's metadata name.
pub fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Sam => "sam",
        Preset::Medsa => "medsa",
        Preset::LiteMedsam => "litemedsam",
    }
}

/// A canonical name of an intensity preset that [`Intensity::parse`] reads back exactly.
pub fn intensity_name(i: Intensity) -> String {
    match i {
        Intensity::Window(a, b) => format!("window:{a},{b}"),
        Intensity::Percentile(a, b) => format!("mr:{a},{b}"),
        Intensity::None => "none".into(),
    }
}

fn safetensors_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Serialises F32 tensors with string metadata as safetensors bytes whose JSON header has sorted
/// keys (the library writes its metadata map in hash order, which differs between runs).
pub(super) fn serialize_sorted(
    path: &Path,
    tensors: &[(String, &Tensor)],
    meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(k, t)| {
            TensorView::new(
                Dtype::F32,
                t.shape().to_vec(),
                bytemuck::cast_slice(t.data()),
            )
            .map(|v| (k.clone(), v))
            .map_err(|e| safetensors_err(path, format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let hm: HashMap<String, String> = meta.clone().into_iter().collect();
    let bytes =
        safetensors::tensor::serialize(views, Some(hm)).map_err(|e| safetensors_err(path, e))?;
    // Layout: u64 header length, JSON header padded with spaces to 8 bytes, data. Re-emitting the
    // header through serde_json's sorted map keeps every offset (they are relative to the data).
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| safetensors_err(path, e))?;
    let mut h = serde_json::to_vec(&header).map_err(|e| safetensors_err(path, e))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Every tensor of a safetensors file, as f32.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = SafetensorsFile::open(path)?;
    read_all(&f)
}

fn read_all(f: &SafetensorsFile) -> Result<BTreeMap<String, Tensor>> {
    f.keys()
        .map(|k| Ok((k.to_string(), f.tensor(k)?)))
        .collect()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes an adapter checkpoint (atomically): `tensors` as F32 and `meta` as metadata.
pub fn save_adapter(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    meta: &AdapterMeta,
) -> Result<()> {
    let bad = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    if tensors.is_empty() {
        return Err(bad("no tensors to save in the adapter checkpoint".into()));
    }
    if !is_sha256_hex(&meta.base_sha256) {
        return Err(bad(format!(
            "base_sha256 \"{}\": expected 64 lower-case hex digits",
            meta.base_sha256
        )));
    }
    if let Some(k) = meta.extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
        return Err(bad(format!(
            "extra metadata key `{k}` is reserved by the adapter format"
        )));
    }
    let mut m: BTreeMap<String, String> = meta.extra.clone();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("format", ADAPTER_FORMAT.into());
    put("base_sha256", meta.base_sha256.clone());
    put("base_file", meta.base_file.clone());
    put("config", config_to_json(&meta.config).to_string());
    put("trainable", meta.trainable.clone());
    put("preset", preset_name(meta.preset).into());
    put("model_size", meta.model_size.to_string());
    if let Some(i) = meta.intensity {
        put("intensity", intensity_name(i));
    }
    put("num_classes", meta.num_classes.to_string());
    put("step", meta.step.to_string());
    if let Some(l) = meta.loss {
        // `Display` of an f64 is the shortest string that reads back to the same value.
        put("loss", l.to_string());
    }
    let list: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    let bytes = serialize_sorted(path, &list, &m)?;
    write_atomic(path, &bytes)
}

/// Reads a metadata value, or an error naming the file and the key.
pub(super) fn meta_str<'a>(
    path: &Path,
    m: &'a HashMap<String, String>,
    key: &str,
) -> Result<&'a str> {
    m.get(key).map(|s| s.as_str()).ok_or_else(|| Error::Format {
        path: path.to_path_buf(),
        msg: format!("metadata `{key}` is missing"),
    })
}

pub(super) fn meta_parse<T: std::str::FromStr>(
    path: &Path,
    m: &HashMap<String, String>,
    key: &str,
    what: &str,
) -> Result<T> {
    let s = meta_str(path, m, key)?;
    s.parse().map_err(|_| Error::Format {
        path: path.to_path_buf(),
        msg: format!("metadata `{key}` = \"{s}\": expected {what}"),
    })
}

/// Reads an adapter checkpoint; errors name the file and the metadata field.
pub fn load_adapter(path: &Path) -> Result<(BTreeMap<String, Tensor>, AdapterMeta)> {
    let f = SafetensorsFile::open(path)?;
    let meta = adapter_meta(&f)?;
    Ok((read_all(&f)?, meta))
}

/// An adapter checkpoint's metadata alone (its header; no tensor is read).
pub fn read_adapter_meta(path: &Path) -> Result<AdapterMeta> {
    adapter_meta(&SafetensorsFile::open(path)?)
}

fn adapter_meta(f: &SafetensorsFile) -> Result<AdapterMeta> {
    let path = f.path();
    let m = f.metadata();
    let fmt_err = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    match m.get("format").map(|s| s.as_str()) {
        Some(ADAPTER_FORMAT) => {}
        Some(other) => {
            return Err(fmt_err(format!(
                "metadata `format` = \"{other}\": expected \"{ADAPTER_FORMAT}\""
            )))
        }
        None => {
            return Err(fmt_err(format!(
                "not an adapter checkpoint: metadata `format` is missing (expected \"{ADAPTER_FORMAT}\"; a full model checkpoint is loaded as the base model instead)"
            )))
        }
    }
    let base_sha256 = meta_str(path, m, "base_sha256")?.to_string();
    if !is_sha256_hex(&base_sha256) {
        return Err(fmt_err(format!(
            "metadata `base_sha256` = \"{base_sha256}\": expected 64 lower-case hex digits"
        )));
    }
    let cfg_text = meta_str(path, m, "config")?;
    let cfg_json: Value = serde_json::from_str(cfg_text)
        .map_err(|e| fmt_err(format!("metadata `config` is not valid JSON: {e}")))?;
    let config = config_from_json(&cfg_json).map_err(|e| fmt_err(format!("metadata {e}")))?;
    let preset = match meta_str(path, m, "preset")? {
        "medsa" => Preset::Medsa,
        "sam" => Preset::Sam,
        "litemedsam" => Preset::LiteMedsam,
        other => {
            return Err(fmt_err(format!(
                "metadata `preset` = \"{other}\": expected \"medsa\", \"sam\" or \"litemedsam\""
            )))
        }
    };
    let intensity = match m.get("intensity") {
        Some(s) => {
            Some(Intensity::parse(s).map_err(|e| fmt_err(format!("metadata `intensity`: {e}")))?)
        }
        None => None,
    };
    let loss = match m.get("loss") {
        Some(_) => Some(meta_parse(path, m, "loss", "a number")?),
        None => None,
    };
    let meta = AdapterMeta {
        base_file: m.get("base_file").cloned().unwrap_or_default(),
        base_sha256,
        config,
        trainable: meta_str(path, m, "trainable")?.to_string(),
        preset,
        model_size: meta_parse(path, m, "model_size", "a positive integer")?,
        intensity,
        num_classes: meta_parse(path, m, "num_classes", "a positive integer")?,
        step: meta_parse(path, m, "step", "a non-negative integer")?,
        loss,
        extra: m
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    if meta.model_size == 0 || meta.num_classes == 0 {
        return Err(fmt_err(
            "metadata `model_size` and `num_classes` must be at least 1".into(),
        ));
    }
    Ok(meta)
}

/// Checks that `base` is the checkpoint `adapter` (with metadata `meta`) was trained on, by
/// SHA-256; returns the base's hash. A different file is an error naming both files and hashes,
/// unless `allow_mismatch` (then the caller takes responsibility for the combination).
pub fn verify_base(
    base: &Path,
    adapter: &Path,
    meta: &AdapterMeta,
    allow_mismatch: bool,
) -> Result<String> {
    let found = sha256_file(base)?;
    if found != meta.base_sha256 && !allow_mismatch {
        let trained_on = if meta.base_file.is_empty() {
            "a base checkpoint".to_string()
        } else {
            format!("base checkpoint {}", meta.base_file)
        };
        return Err(Error::Config {
            path: adapter.to_path_buf(),
            msg: format!(
                "trained on {trained_on} with sha256 {}, but {} has sha256 {found}; use the base model it was trained with, or allow the mismatch explicitly (--allow-base-mismatch)",
                meta.base_sha256,
                base.display()
            ),
        });
    }
    Ok(found)
}

/// Lays adapter tensors over a base store: same-named tensors are replaced (shapes must match;
/// the error names the key, both shapes and `source`), new keys added.
pub fn overlay(
    base: &mut WeightStore,
    source: &Path,
    adapter: BTreeMap<String, Tensor>,
) -> Result<()> {
    base.overlay(source, adapter)
}

/// [`overlay`] for a base held as a map of tensors. Checks every shape before changing anything.
pub fn overlay_map(
    base: &mut BTreeMap<String, Tensor>,
    source: &Path,
    adapter: &BTreeMap<String, Tensor>,
) -> Result<()> {
    for (k, t) in adapter {
        if let Some(b) = base.get(k) {
            if b.shape() != t.shape() {
                return Err(Error::ShapeMismatch {
                    path: source.to_path_buf(),
                    key: k.clone(),
                    expected: b.shape().to_vec(),
                    found: t.shape().to_vec(),
                });
            }
        }
    }
    base.extend(adapter.iter().map(|(k, t)| (k.clone(), t.clone())));
    Ok(())
}

/// Opens `base`, checks it against the adapter's recorded hash ([`verify_base`]) and lays the
/// adapter over it: the store is ready for `Sam::from_store`.
pub fn apply_adapter(
    base: &Path,
    adapter: &Path,
    allow_mismatch: bool,
) -> Result<(WeightStore, AdapterMeta)> {
    let (tensors, meta) = load_adapter(adapter)?;
    verify_base(base, adapter, &meta, allow_mismatch)?;
    let mut ws = WeightStore::open(base)?;
    overlay(&mut ws, adapter, tensors)?;
    Ok((ws, meta))
}

/// The keys of a trainable set: `adapters` (every `*_Adapter.*` tensor: strict parameter-efficient
/// training) or `adapters+decoder` (also every `mask_decoder.*` tensor, as the reference trains).
pub fn trainable_keys<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    trainable: &str,
) -> Result<Vec<String>> {
    // Adapter checkpoints name their set; the membership rule itself is `nn::Trainable`'s.
    if !matches!(trainable, "adapters" | "adapters+decoder") {
        return Err(Error::Input(format!(
            "trainable set \"{trainable}\": expected \"adapters\" or \"adapters+decoder\""
        )));
    }
    let set = crate::nn::Trainable::parse(trainable)?;
    Ok(keys
        .into_iter()
        .filter(|k| set.contains(k))
        .map(String::from)
        .collect())
}

/// Which adapters [`init_adapters`] adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterChoice {
    /// `Space_Adapter` and `MLP_Adapter` in every encoder block (SPEC section 2).
    pub encoder: bool,
    /// `Depth_Adapter` in every encoder block (SD-Trans, SPEC section 3).
    pub depth: bool,
    /// `Hyper_Adapter`, `MLP_Adapter` and `Cross_Adapter` in every decoder layer (section 4).
    pub decoder: bool,
}

impl AdapterChoice {
    /// Parses a `+`- or `,`-separated list of `encoder`, `depth`, `decoder` (or `all`).
    pub fn parse(s: &str) -> Result<Self> {
        let mut c = AdapterChoice::default();
        for part in s.split(['+', ',']).map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "encoder" => c.encoder = true,
                "depth" => c.depth = true,
                "decoder" => c.decoder = true,
                "all" => {
                    c = AdapterChoice {
                        encoder: true,
                        depth: true,
                        decoder: true,
                    }
                }
                other => {
                    return Err(Error::Input(format!(
                    "adapters \"{other}\": expected encoder, depth, decoder or all (joined with +)"
                )))
                }
            }
        }
        if c == AdapterChoice::default() {
            return Err(Error::Input(format!(
                "adapters \"{s}\": name at least one of encoder, depth, decoder"
            )));
        }
        Ok(c)
    }
}

/// Adds initialised tensors to a map and records their keys.
struct Init<'a> {
    tensors: &'a mut BTreeMap<String, Tensor>,
    rng: Rng,
    added: Vec<String>,
}

impl Init<'_> {
    fn put(&mut self, k: String, t: Tensor) {
        self.added.push(k.clone());
        self.tensors.insert(k, t);
    }

    /// Whether the adapter at prefix `p` is not in the map yet.
    fn absent(&self, p: &str) -> bool {
        !self.tensors.contains_key(&format!("{p}.D_fc1.weight"))
    }

    /// `nn.Linear`'s default: weight and bias uniform in +-1/sqrt(fan_in).
    fn linear(&mut self, p: &str, i: usize, o: usize) {
        let a = 1.0 / (i as f32).sqrt();
        let w = self.rng.tensor(&[o, i], a);
        let b = self.rng.tensor(&[o], a);
        self.put(format!("{p}.weight"), w);
        self.put(format!("{p}.bias"), b);
    }

    /// `D_fc1` like `nn.Linear`, `D_fc2` at zero: the adapter's branch starts at exactly 0.
    fn bottleneck(&mut self, p: &str, dim: usize, r: usize) {
        self.linear(&format!("{p}.D_fc1"), dim, r);
        self.put(format!("{p}.D_fc2.weight"), Tensor::zeros(&[dim, r]));
        self.put(format!("{p}.D_fc2.bias"), Tensor::zeros(&[dim]));
    }
}

/// Adds the Med-SA adapters `which` selects to `tensors` for the model `cfg` describes (the base
/// checkpoint's configuration), initialised as the module documentation says, deterministically
/// for a given seed. Adapters the base already has (per `cfg`) or `tensors` already holds are
/// left alone. Returns the added keys, sorted.
pub fn init_adapters(
    tensors: &mut BTreeMap<String, Tensor>,
    cfg: &SamConfig,
    which: AdapterChoice,
    seed: u64,
) -> Result<Vec<String>> {
    let d = cfg.embed_dim;
    let r_enc = cfg.adapter_dim.unwrap_or(d / 4);
    let pd = cfg.prompt_dim;
    let r_dec = pd / 4;
    if (which.encoder || which.depth) && r_enc == 0 {
        return Err(Error::Input(format!(
            "encoder width {d} is too small for adapters of width D/4"
        )));
    }
    if which.decoder && r_dec == 0 {
        return Err(Error::Input(format!(
            "decoder width {pd} is too small for adapters of width d/4"
        )));
    }
    let mut init = Init {
        tensors,
        rng: Rng::new(seed),
        added: Vec::new(),
    };
    // The blocks that take adapters: `(key prefix, width, adapters present)`. TinyViT's are
    // its attention blocks (Med-SA's TinyViTAdapterBlock), each at its stage's width with a
    // bottleneck of a quarter of it.
    let mut blocks: Vec<(String, usize, usize, [bool; 3])> = cfg
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                format!("image_encoder.blocks.{i}"),
                d,
                r_enc,
                [b.space_adapter, b.mlp_adapter, b.depth_adapter],
            )
        })
        .collect();
    if let Some(t) = &cfg.tiny_vit {
        for (s, st) in t.stages.iter().enumerate().filter(|(_, st)| !st.is_conv()) {
            for (j, b) in st.blocks.iter().enumerate() {
                blocks.push((
                    format!("image_encoder.layers.{s}.blocks.{j}"),
                    st.width,
                    st.width / 4,
                    [b.space_adapter, b.mlp_adapter, b.depth_adapter],
                ));
            }
        }
    }
    for (p, width, r, has) in blocks {
        for (want, has, name) in [
            (which.encoder, has[0], "Space_Adapter"),
            (which.encoder, has[1], "MLP_Adapter"),
            (which.depth, has[2], "Depth_Adapter"),
        ] {
            let q = format!("{p}.{name}");
            if want && !has && init.absent(&q) {
                init.bottleneck(&q, width, r);
            }
        }
    }
    if which.decoder {
        for (i, l) in cfg.decoder_layers.iter().enumerate() {
            let p = format!("mask_decoder.transformer.layers.{i}");
            let q = format!("{p}.Hyper_Adapter");
            if !l.hyper && init.absent(&q) {
                init.bottleneck(&q, pd, r_dec);
                init.linear(&format!("{q}.hyper.0"), pd, pd);
                init.linear(&format!("{q}.hyper.2"), pd, r_dec * r_dec);
                init.put(format!("{q}.norm.weight"), Tensor::full(&[r_dec], 1.0));
                init.put(format!("{q}.norm.bias"), Tensor::zeros(&[r_dec]));
            }
            for (has, name) in [(l.mlp, "MLP_Adapter"), (l.cross, "Cross_Adapter")] {
                let q = format!("{p}.{name}");
                if !has && init.absent(&q) {
                    init.bottleneck(&q, pd, r_dec);
                }
            }
        }
    }
    let mut added = init.added;
    added.sort();
    Ok(added)
}

pub use super::state::{load_state, save_state, state_path, TrainState};
