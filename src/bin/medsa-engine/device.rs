//! Where the model runs and which model, as the command line names them: the library's
//! [`medsa::runtime::Device`] opened from `--device`/`--precision`, and the checkpoint (with an
//! optional adapter) of `segment`-style arguments, loaded with its adapter's training line
//! printed.

use anyhow::Result;

use medsa::backend::{Backend, RunOptions};
use medsa::meta::ModelMeta;
pub(super) use medsa::on_device;
pub(super) use medsa::runtime::{Device as Dev, ModelSource};
use medsa::sam::Sam;

use crate::cli::{flavour_of, SegmentArgs};

pub(super) fn open_device(device: &str, precision: &str, opts: &RunOptions) -> Result<Dev> {
    Ok(Dev::open(device, precision, opts)?)
}

/// The command line's way to name and load a model.
pub(super) trait CliSource: Sized {
    /// The model `segment`-style arguments name.
    fn of(a: &SegmentArgs) -> Self;
    /// Loads it (see [`ModelSource::open_on`]), printing how its adapter was trained.
    fn load<B: Backend>(&self, be: &B, meta: &ModelMeta) -> Result<Sam<B>>;
}

impl CliSource for ModelSource {
    fn of(a: &SegmentArgs) -> Self {
        ModelSource {
            checkpoint: a.checkpoint.clone(),
            adapter: a.adapter.clone(),
            allow_base_mismatch: a.allow_base_mismatch,
            decoder_flavour: a.decoder_flavour.map(flavour_of),
        }
    }

    fn load<B: Backend>(&self, be: &B, meta: &ModelMeta) -> Result<Sam<B>> {
        let (sam, note) = self.open_on(be, meta)?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        Ok(sam)
    }
}
