//! medsa: the Medical SAM Adapter (SAM + Med-SA adapters, SD-Trans, HyP-Adpt) on a CPU reference
//! backend and NVIDIA GPUs.
//!
//! `docs/SPEC.md` defines the model; [`backend::Backend`] is the op set;
//! [`sam::Sam`] is the model.

#![warn(missing_docs)]

pub mod backend;
pub mod batch;
pub mod data;
pub mod error;
pub mod host_pool;
pub mod limits;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::Tensor;
pub mod medsa;
pub mod meta;
pub mod metrics;
pub mod nn;
pub mod pipeline;
pub mod pth;
pub mod runtime;
pub mod sam;
pub mod selftest;
pub mod weights;
