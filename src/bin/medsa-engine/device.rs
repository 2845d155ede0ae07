//! Where the model runs and which model: the backend chosen by `--device`/`--precision` (`Dev`,
//! `open_device`, the `on_device!` dispatch macro) and a checkpoint with an optional adapter on
//! top, loaded onto it (`ModelSource`).

use std::path::PathBuf;

#[cfg(feature = "cuda")]
use anyhow::Context;
use anyhow::{anyhow, bail, Result};

use medsa::backend::cpu::Cpu;
use medsa::backend::{Backend, RunOptions};
use medsa::meta::ModelMeta;
use medsa::sam::{DecoderFlavour, LoadOptions, Sam};

use crate::cli::{flavour_of, SegmentArgs};

/// The backend chosen on the command line.
#[allow(clippy::large_enum_variant)] // one value per process
pub(super) enum Dev {
    Cpu(Cpu),
    #[cfg(feature = "cuda")]
    Cuda(medsa::backend::cuda::Cuda),
}

/// Runs a generic body on whichever backend `Dev` holds.
macro_rules! on_device {
    ($dev:expr, $be:ident => $body:expr) => {
        match $dev {
            $crate::device::Dev::Cpu($be) => $body,
            #[cfg(feature = "cuda")]
            $crate::device::Dev::Cuda($be) => $body,
        }
    };
}
pub(super) use on_device;

impl Dev {
    pub(super) fn peak_bytes(&self) -> Option<usize> {
        match self {
            Dev::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => Some(c.pool().peak()),
        }
    }

    /// The opt-in attention kernel options in effect for an encoder with head dim `d` whose
    /// global blocks attend over a `grid x grid` map, `[q128, rel_mma, trim, exp2, prefetch]`
    /// (all false on the CPU).
    pub(super) fn attention_options(&self, d: usize, grid: usize) -> [bool; 5] {
        match self {
            Dev::Cpu(_) => {
                let _ = (d, grid);
                [false; 5]
            }
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => {
                let o = c.attention_options_for(d, grid);
                [o.q128, o.rel_mma, o.trim, o.exp2, o.prefetch]
            }
        }
    }

    /// The opt-in CUDA kernel choices in effect, `(gelu_tanh_epilogue, layernorm_rows)` (both
    /// false on the CPU).
    pub(super) fn kernel_options(&self) -> (bool, bool) {
        match self {
            Dev::Cpu(_) => (false, false),
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => {
                let o = c.run_options();
                (o.gelu_tanh_epilogue, o.layernorm_rows)
            }
        }
    }

    pub(super) fn take_profile(&self) -> Vec<(String, u64, f64)> {
        match self {
            Dev::Cpu(_) => Vec::new(),
            #[cfg(feature = "cuda")]
            Dev::Cuda(c) => c.take_profile(),
        }
    }

    pub(super) fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Dev::Cuda(c) = self {
            c.pool().reset_peak();
        }
    }
}

pub(super) fn open_device(device: &str, precision: &str, opts: &RunOptions) -> Result<Dev> {
    match device {
        "cpu" => {
            let p: medsa::backend::Precision = precision.parse()?;
            Ok(Dev::Cpu(Cpu::with_options(opts).with_precision(p)))
        }
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal: usize = match d.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow!("--device {d}: expected cuda or cuda:N"))?,
                None => 0,
            };
            #[cfg(feature = "cuda")]
            {
                let p: medsa::backend::cuda::Precision = precision.parse()?;
                // The host pool (which `Cpu::with_options` sizes) serves host tensors here too.
                medsa::host_pool::set_cap_mb(opts.host_pool_mb);
                // Tests of the CUDA paths on machines without a GPU: the backend on the CPU
                // kernel emulator built from kernels/*.cu (tests/common/kemu.rs builds it).
                if let Some(lib) = std::env::var_os("MEDSA_CUDA_EMULATOR") {
                    let lib = PathBuf::from(lib);
                    eprintln!(
                        "--device {d}: MEDSA_CUDA_EMULATOR is set: the CUDA kernels run on the CPU emulator {}",
                        lib.display()
                    );
                    let mut c = medsa::backend::cuda::Cuda::emulated(&lib, p)
                        .with_context(|| format!("--device {d} (MEDSA_CUDA_EMULATOR)"))?;
                    c.set_run_options(opts);
                    return Ok(Dev::Cuda(c));
                }
                let mut c = medsa::backend::cuda::Cuda::new(ordinal, p)
                    .with_context(|| format!("--device {d}"))?;
                c.set_run_options(opts);
                Ok(Dev::Cuda(c))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = ordinal;
                bail!("--device {d}: this medsa-engine was built without the `cuda` feature; use --device cpu")
            }
        }
        d => bail!("--device {d}: expected cpu or cuda[:N]"),
    }
}

/// A checkpoint, optionally with an adapter checkpoint on top.
pub(super) struct ModelSource {
    pub(super) checkpoint: PathBuf,
    pub(super) adapter: Option<PathBuf>,
    pub(super) allow_base_mismatch: bool,
    /// `--decoder-flavour`: wins over metadata and key names.
    pub(super) decoder_flavour: Option<DecoderFlavour>,
}

impl ModelSource {
    pub(super) fn of(a: &SegmentArgs) -> Self {
        ModelSource {
            checkpoint: a.checkpoint.clone(),
            adapter: a.adapter.clone(),
            allow_base_mismatch: a.allow_base_mismatch,
            decoder_flavour: a.decoder_flavour.map(flavour_of),
        }
    }

    /// What the model's files record about running it: the adapter's training metadata when
    /// there is an adapter, else the checkpoint's own (a merged model keeps its adapter's).
    pub(super) fn meta(&self) -> Result<ModelMeta> {
        Ok(match &self.adapter {
            Some(a) => ModelMeta::of_adapter(a, &medsa::train::checkpoint::read_adapter_meta(a)?)?,
            None => ModelMeta::of_checkpoint(&self.checkpoint)?,
        })
    }

    /// Loads the model; `meta` is [`ModelSource::meta`], which supplies the decoder flavour
    /// unless `--decoder-flavour` forces one.
    pub(super) fn load<B: Backend>(&self, be: &B, meta: &ModelMeta) -> Result<Sam<B>> {
        let opts = LoadOptions {
            decoder_flavour: self.decoder_flavour.or(meta.decoder_flavour),
        };
        match &self.adapter {
            None => Ok(Sam::load_with(be, &self.checkpoint, &opts)?),
            Some(a) => {
                let (mut ws, meta) = medsa::train::checkpoint::apply_adapter(
                    &self.checkpoint,
                    a,
                    self.allow_base_mismatch,
                )?;
                eprintln!(
                    "adapter {}: trained as {} for {} steps (preset {}, size {})",
                    a.display(),
                    meta.trainable,
                    meta.step,
                    medsa::train::checkpoint::preset_name(meta.preset),
                    meta.model_size
                );
                Ok(Sam::from_store_with(be, &mut ws, &opts)?)
            }
        }
    }
}
