//! One model on whichever backend, behind a non-generic type: what the command line opens and
//! what the Python package (`bindings/python`) and the C ABI (`bindings/c`) wrap, so that all
//! three run the same loading, preprocessing and segmentation code.
//!
//! [`Device`] is a backend chosen by name (`cpu`, `cuda`, `cuda:N`) and precision;
//! [`ModelSource`] is a checkpoint with an optional adapter on top and the defaults its metadata
//! records ([`ModelDefaults`]); [`Model`] is the two loaded together, with `embed`, `decode` and
//! `segment_*` entry points on plain host arrays.

mod model;

use std::path::PathBuf;

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Precision, RunOptions};
use crate::batch::Intensity;
use crate::error::{Error, Result};
use crate::medsa::depth_branch::DepthMode;
use crate::meta::ModelMeta;
use crate::pipeline::Preset;
use crate::sam::{DecoderFlavour, LoadOptions, Sam};

pub use model::{Decoded, Embeddings, Model, SegmentOptions};

/// A backend chosen by name at run time.
#[allow(clippy::large_enum_variant)] // one value per process or model
pub enum Device {
    /// The CPU reference backend (f32, or bf16 products).
    Cpu(Cpu),
    /// An NVIDIA GPU (or the CPU emulator of its kernels, for tests).
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::Cuda),
}

/// Runs a generic body on whichever backend a [`Device`] holds.
#[macro_export]
macro_rules! on_device {
    ($dev:expr, $be:ident => $body:expr) => {
        match $dev {
            $crate::runtime::Device::Cpu($be) => $body,
            #[cfg(feature = "cuda")]
            $crate::runtime::Device::Cuda($be) => $body,
        }
    };
}

impl Device {
    /// Opens `device` (`cpu`, `cuda` or `cuda:N`) at `precision` (`f32` or `bf16`). With
    /// `MEDSA_CUDA_EMULATOR` set (a developer diagnostic), `cuda` runs the CUDA kernels on the CPU
    /// emulator library it names.
    pub fn open(device: &str, precision: &str, opts: &RunOptions) -> Result<Device> {
        let p: Precision = precision.parse()?;
        match device {
            "cpu" => Ok(Device::Cpu(Cpu::with_options(opts).with_precision(p))),
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal: usize = match d.strip_prefix("cuda:") {
                    Some(n) => n.parse().map_err(|_| {
                        Error::Input(format!("device \"{d}\": expected cpu, cuda or cuda:N"))
                    })?,
                    None => 0,
                };
                #[cfg(feature = "cuda")]
                {
                    // The host pool (which `Cpu::with_options` sizes) serves host tensors here too.
                    crate::host_pool::set_cap_mb(opts.host_pool_mb);
                    let wrap = |e: Error| Error::Input(format!("device \"{d}\": {e}"));
                    if let Some(lib) = std::env::var_os("MEDSA_CUDA_EMULATOR") {
                        let lib = PathBuf::from(lib);
                        eprintln!(
                            "device {d}: MEDSA_CUDA_EMULATOR is set: the CUDA kernels run on the CPU emulator {}",
                            lib.display()
                        );
                        let mut c = crate::backend::cuda::Cuda::emulated(&lib, p).map_err(wrap)?;
                        c.set_run_options(opts);
                        return Ok(Device::Cuda(c));
                    }
                    let mut c = crate::backend::cuda::Cuda::new(ordinal, p).map_err(wrap)?;
                    c.set_run_options(opts);
                    Ok(Device::Cuda(c))
                }
                #[cfg(not(feature = "cuda"))]
                {
                    let _ = ordinal;
                    Err(Error::Input(format!(
                        "device \"{d}\": this build of medsa has no CUDA backend (the `cuda` feature); use cpu"
                    )))
                }
            }
            d => Err(Error::Input(format!(
                "device \"{d}\": expected cpu, cuda or cuda:N"
            ))),
        }
    }

    /// The backend's description (device, precision, kernels).
    pub fn name(&self) -> String {
        on_device!(self, be => be.name())
    }

    /// The device memory high-water mark in bytes (`None` on the CPU).
    pub fn peak_bytes(&self) -> Option<usize> {
        match self {
            Device::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => Some(c.pool().peak()),
        }
    }

    /// The opt-in attention kernel options in effect for an encoder with head dim `d` whose
    /// global blocks attend over a `grid x grid` map, `[q128, rel_mma, trim, exp2, prefetch]`
    /// (all false on the CPU).
    pub fn attention_options(&self, d: usize, grid: usize) -> [bool; 5] {
        match self {
            Device::Cpu(_) => {
                let _ = (d, grid);
                [false; 5]
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => {
                let o = c.attention_options_for(d, grid);
                [o.q128, o.rel_mma, o.trim, o.exp2, o.prefetch]
            }
        }
    }

    /// The opt-in CUDA kernel choices in effect, `(gelu_tanh_epilogue, layernorm_rows)` (both
    /// false on the CPU).
    pub fn kernel_options(&self) -> (bool, bool) {
        match self {
            Device::Cpu(_) => (false, false),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => {
                let o = c.run_options();
                (o.gelu_tanh_epilogue, o.layernorm_rows)
            }
        }
    }

    /// The per-kernel profile gathered since the last call (`MEDSA_PROFILE`; empty on the CPU):
    /// `(name, calls, milliseconds)`.
    pub fn take_profile(&self) -> Vec<(String, u64, f64)> {
        match self {
            Device::Cpu(_) => Vec::new(),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => c.take_profile(),
        }
    }

    /// Restarts the device memory high-water mark.
    pub fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(c) = self {
            c.pool().reset_peak();
        }
    }
}

/// A checkpoint, optionally with an adapter checkpoint on top.
#[derive(Clone, Debug, Default)]
pub struct ModelSource {
    /// The base (or merged) checkpoint, `.safetensors`.
    pub checkpoint: PathBuf,
    /// Trained adapter tensors to overlay (`medsa-engine train` output).
    pub adapter: Option<PathBuf>,
    /// Accept an adapter trained on a different base file (its SHA-256 differs).
    pub allow_base_mismatch: bool,
    /// Forces the decoder flavour over metadata and key names.
    pub decoder_flavour: Option<DecoderFlavour>,
}

impl ModelSource {
    /// A checkpoint with an optional adapter.
    pub fn new(checkpoint: impl Into<PathBuf>, adapter: Option<PathBuf>) -> Self {
        ModelSource {
            checkpoint: checkpoint.into(),
            adapter,
            ..Default::default()
        }
    }

    /// What the model's files record about running it: the adapter's training metadata when
    /// there is an adapter, else the checkpoint's own (a merged model keeps its adapter's).
    pub fn meta(&self) -> Result<ModelMeta> {
        match &self.adapter {
            Some(a) => ModelMeta::of_adapter(a, &crate::train::checkpoint::read_adapter_meta(a)?),
            None => ModelMeta::of_checkpoint(&self.checkpoint),
        }
    }

    /// Loads the model onto `be`; `meta` is [`ModelSource::meta`], which supplies the decoder
    /// flavour unless [`ModelSource::decoder_flavour`] forces one. With an adapter, also returns
    /// a line saying how it was trained (for the user's log).
    pub fn open_on<B: Backend>(
        &self,
        be: &B,
        meta: &ModelMeta,
    ) -> Result<(Sam<B>, Option<String>)> {
        let opts = LoadOptions {
            decoder_flavour: self.decoder_flavour.or(meta.decoder_flavour),
        };
        match &self.adapter {
            None => Ok((Sam::load_with(be, &self.checkpoint, &opts)?, None)),
            Some(a) => {
                let (mut ws, meta) = crate::train::checkpoint::apply_adapter(
                    &self.checkpoint,
                    a,
                    self.allow_base_mismatch,
                )?;
                let note = format!(
                    "adapter {}: trained as {} for {} steps (preset {}, size {})",
                    a.display(),
                    meta.trainable,
                    meta.step,
                    crate::train::checkpoint::preset_name(meta.preset),
                    meta.model_size
                );
                Ok((Sam::from_store_with(be, &mut ws, &opts)?, Some(note)))
            }
        }
    }
}

/// How a model is fed unless the caller says otherwise: what its metadata records (an adapter's
/// training preset, intensity window and label), else the architecture's own preset, else SAM's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelDefaults {
    /// 2D image preprocessing.
    pub preset: Preset,
    /// Volume slice preprocessing.
    pub volume_preset: Preset,
    /// Volume intensity mapping.
    pub intensity: Intensity,
    /// Depth-branch semantics.
    pub depth_mode: DepthMode,
    /// The label id the model was trained on, when recorded.
    pub label_id: Option<u32>,
    /// Where the presets came from: the metadata, the architecture, or neither (`None`).
    pub preset_source: Option<&'static str>,
}

impl ModelDefaults {
    /// The defaults for a model loaded from `src` with metadata `meta` and decoder `flavour`.
    pub fn of(src: &ModelSource, meta: &ModelMeta, flavour: DecoderFlavour) -> Result<Self> {
        let arch = crate::meta::architecture_preset_of(&src.checkpoint);
        let (preset, source) = match (meta.preset, arch) {
            (Some(p), _) => (Some(p), Some("metadata")),
            (None, Some(p)) => (Some(p), Some("architecture")),
            (None, None) => (None, None),
        };
        Ok(ModelDefaults {
            preset: preset.unwrap_or(Preset::Sam),
            volume_preset: preset.unwrap_or(Preset::Medsa),
            intensity: match meta.intensity {
                Some(i) => i,
                None => Intensity::parse("ct")?,
            },
            depth_mode: meta.depth_mode_or(flavour),
            label_id: meta.label_id,
            preset_source: source,
        })
    }
}
