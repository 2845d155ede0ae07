//! Adapter fine-tuning: the `train` command's library side. [`trainer::train`] runs a whole
//! job (data discovery and loading, prompts sampled from masks, forward and explicit backward
//! through the model, losses, AdamW with schedules and clipping, validation, checkpoints that
//! resume exactly); [`step`] is one forward-backward step, [`checkpoint`] the adapter format,
//! [`loss`], [`optim`] and [`sampler`] the pieces.

mod cases;
pub mod checkpoint;
pub mod config_json;
pub mod data;
mod evaluate;
mod loader;
pub mod loss;
pub mod optim;
pub mod sampler;
pub mod sha256;
mod state;
pub mod step;
pub mod trainer;
