//! Parameter gradients and the parameter registry used by training.
//!
//! Parameters are named by their checkpoint keys (the same names the weights file uses), so
//! trainable sets, gradients and saved adapters all speak one language. A few parameters are
//! stored in a different shape than in the checkpoint (the neck's 1x1 convolution is kept as a
//! `[C, D]` linear layer, the IoU and mask tokens are kept concatenated as
//! `mask_decoder.output_tokens`); [`Param`] records that so a checkpoint round trip is exact.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::Tensor;

/// Which parameters are trained: a predicate on the parameter name.
pub struct Trainable {
    pred: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// How the set was specified (`adapters`, `adapters+decoder`, `all`, or the patterns).
    pub spec: String,
}

impl Trainable {
    /// Parses a trainable-set specification:
    /// - `adapters`: every Med-SA adapter tensor (name contains `Adapter`), encoder and decoder;
    /// - `adapters+decoder`: those plus the whole mask decoder (what the reference trains);
    /// - `all`: image encoder and mask decoder (the prompt encoder stays frozen);
    /// - `none`: nothing (evaluation);
    /// - otherwise a comma-separated list of name patterns where `*` matches any run of
    ///   characters (`image_encoder.blocks.*.Space_Adapter.*,mask_decoder.*`).
    pub fn parse(spec: &str) -> Result<Self> {
        let pred: Box<dyn Fn(&str) -> bool + Send + Sync> = match spec {
            "adapters" => Box::new(|n: &str| n.contains("Adapter")),
            "adapters+decoder" => {
                Box::new(|n: &str| n.contains("Adapter") || n.starts_with("mask_decoder."))
            }
            "all" => Box::new(|n: &str| {
                n.starts_with("image_encoder.") || n.starts_with("mask_decoder.")
            }),
            "none" => Box::new(|_: &str| false),
            _ => {
                let pats: Vec<String> = spec
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                if pats.is_empty() {
                    return Err(crate::Error::Input(format!(
                        "trainable set \"{spec}\": expected adapters, adapters+decoder, all, none \
                         or comma-separated name patterns"
                    )));
                }
                Box::new(move |n: &str| pats.iter().any(|p| glob(p, n)))
            }
        };
        Ok(Trainable {
            pred,
            spec: spec.to_string(),
        })
    }

    /// Whether the parameter `name` is trained.
    pub fn contains(&self, name: &str) -> bool {
        // The prompt encoder is frozen by design (SPEC section 6): its embeddings are inputs.
        !name.starts_with("prompt_encoder.") && (self.pred)(name)
    }
}

/// `*` matches any (possibly empty) run of characters; everything else literally.
fn glob(pat: &str, s: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    if parts.len() == 1 {
        return pat == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Accumulated gradients of the trainable parameters. Frozen parameters never get a buffer, and
/// layers skip computing their weight gradients altogether.
pub struct Grads<B: Backend> {
    trainable: std::sync::Arc<Trainable>,
    /// Gradient per parameter name, in the parameter's in-model shape.
    pub map: BTreeMap<String, B::Tensor>,
}

impl<B: Backend> Grads<B> {
    /// Empty gradients for `trainable`.
    pub fn new(trainable: std::sync::Arc<Trainable>) -> Self {
        Grads {
            trainable,
            map: BTreeMap::new(),
        }
    }

    /// Whether `name` is trained (its gradient is wanted).
    pub fn wants(&self, name: &str) -> bool {
        self.trainable.contains(name)
    }

    /// Adds `g` to the gradient of `name` (if trained).
    pub fn accum(&mut self, be: &B, name: &str, g: B::Tensor) -> Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        match self.map.remove(name) {
            Some(old) => {
                let s = be.add_scaled(&old, 1.0, &g, 1.0)?;
                self.map.insert(name.to_string(), s);
            }
            None => {
                self.map.insert(name.to_string(), g);
            }
        }
        Ok(())
    }

    /// Drops every buffer (the next micro-batch starts from zero).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// A mutable view of one model parameter, for optimisers and checkpoints.
pub enum Param<'a, B: Backend> {
    /// A device tensor stored in its checkpoint shape (or a reshape of it).
    Dev(&'a mut B::Tensor),
    /// A host tensor the model resamples per input (rel-pos tables, the position embedding);
    /// after changing one, call `Sam::refresh_caches`.
    Host(&'a mut Tensor),
}

/// Collects `(name, Param)` pairs.
pub type ParamList<'a, B> = Vec<(String, Param<'a, B>)>;
