//! The Segment Anything Model with the Med-SA additions.

pub mod config;
mod encoder_fused;
mod encoder_train;
pub mod image_encoder;
pub mod mask_decoder;
pub mod model;
pub mod prompt_encoder;
pub mod random;
pub mod rel_pos;
pub mod tiny_vit;
pub mod two_way;

pub use config::{DecoderFlavour, SamConfig};
pub use image_encoder::DepthSpec;
pub use model::{LoadOptions, MaskOutput, Sam, SamOutput};
pub use prompt_encoder::Prompts;

use crate::backend::Backend;

/// Optional record of intermediate activations (named as in the golden fixtures), for parity
/// tests and debugging. Off, it costs nothing.
pub struct Trace<B: Backend> {
    enabled: bool,
    /// `(stage name, activation)` in execution order.
    pub items: Vec<(String, B::Tensor)>,
}

impl<B: Backend> Trace<B> {
    /// A trace that records nothing.
    pub fn off() -> Self {
        Trace {
            enabled: false,
            items: Vec::new(),
        }
    }

    /// A trace that records every stage.
    pub fn on() -> Self {
        Trace {
            enabled: true,
            items: Vec::new(),
        }
    }

    /// Records `t` under `name` if enabled.
    pub fn record(&mut self, _be: &B, name: &str, t: &B::Tensor) {
        if self.enabled {
            self.items.push((name.to_string(), t.clone()));
        }
    }

    /// Records `t` under a lazily built name if enabled.
    pub fn record_with(&mut self, _be: &B, name: impl FnOnce() -> String, t: &B::Tensor) {
        if self.enabled {
            self.items.push((name(), t.clone()));
        }
    }

    /// Whether the trace records (lets callers skip building trace-only tensors).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The recorded activation called `name`.
    pub fn get(&self, name: &str) -> Option<&B::Tensor> {
        self.items.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}
