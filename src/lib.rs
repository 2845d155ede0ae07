//! medsa: the Medical SAM Adapter (SAM + Med-SA adapters, SD-Trans, HyP-Adpt) on a CPU reference
//! backend and NVIDIA GPUs.
//!
//! `../shared/SPEC.md` (mirrored in `docs/`) defines the model; [`backend::Backend`] is the op set;
//! [`sam::Sam`] is the model.

#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::Tensor;
