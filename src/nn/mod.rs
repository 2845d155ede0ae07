//! Layers with explicit passes.
//!
//! Each layer owns its parameters as named backend tensors (field names follow the checkpoint
//! keys) and exposes `forward`. The backward rule, when layers gain their backward passes:
//! forward returns what backward needs; parameter gradients accumulate (`+=`) so that
//! micro-batches add up; activation gradients are assigned (a fresh tensor per call).

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::weights::WeightStore;

/// `y = act(x W^T + b)`, PyTorch's `nn.Linear`.
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias`.
    pub fn load(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = be.upload(&ws.take(&format!("{prefix}.weight"), &[out, inp])?)?;
        let bias = if bias {
            Some(be.upload(&ws.take(&format!("{prefix}.bias"), &[out])?)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Output features.
    pub fn out_features(&self, be: &B) -> usize {
        be.dims(&self.weight)[0]
    }

    /// `x` is `[.., in]`.
    pub fn forward(&self, be: &B, x: &B::Tensor, act: Act) -> Result<B::Tensor> {
        be.linear(x, &self.weight, self.bias.as_ref(), act)
    }
}

/// LayerNorm over the last dimension (also LayerNorm2d on channels-last maps).
pub struct LayerNorm<B: Backend> {
    /// `[C]`.
    pub weight: B::Tensor,
    /// `[C]`.
    pub bias: B::Tensor,
    /// Variance epsilon.
    pub eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[c]`.
    pub fn load(be: &B, ws: &mut WeightStore, prefix: &str, c: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: be.upload(&ws.take(&format!("{prefix}.weight"), &[c])?)?,
            bias: be.upload(&ws.take(&format!("{prefix}.bias"), &[c])?)?,
            eps,
        })
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// 2D convolution on channels-last maps with PyTorch weight layout.
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: Option<B::Tensor>,
    /// Stride.
    pub stride: usize,
    /// Symmetric zero padding.
    pub pad: usize,
}

impl<B: Backend> Conv2d<B> {
    /// Loads `{prefix}.weight` `[out, inp, k, k]` (and `{prefix}.bias` if `bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = be.upload(&ws.take(&format!("{prefix}.weight"), &[out, inp, k, k])?)?;
        let bias = if bias {
            Some(be.upload(&ws.take(&format!("{prefix}.bias"), &[out])?)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            stride,
            pad,
        })
    }

    /// `x` is `[B, H, W, in]`.
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.pad)
    }
}

/// Transposed convolution, kernel 2, stride 2 (the mask decoder's upscaling).
pub struct ConvTranspose2x2<B: Backend> {
    /// `[in, out, 2, 2]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: B::Tensor,
}

impl<B: Backend> ConvTranspose2x2<B> {
    /// Loads `{prefix}.weight` `[inp, out, 2, 2]` and `{prefix}.bias`.
    pub fn load(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        inp: usize,
        out: usize,
    ) -> Result<Self> {
        Ok(ConvTranspose2x2 {
            weight: be.upload(&ws.take(&format!("{prefix}.weight"), &[inp, out, 2, 2])?)?,
            bias: be.upload(&ws.take(&format!("{prefix}.bias"), &[out])?)?,
        })
    }

    /// `x` is `[B, H, W, in]`; output `[B, 2H, 2W, out]`.
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        be.conv_transpose2x2(x, &self.weight, &self.bias)
    }
}

/// A stack of linear layers with ReLU between them (SAM's `MLP`: hypernetworks, IoU head).
pub struct Mlp<B: Backend> {
    /// `layers.{i}`.
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    /// Loads `{prefix}.layers.{i}` for dims `dims[i] -> dims[i+1]`.
    pub fn load(be: &B, ws: &mut WeightStore, prefix: &str, dims: &[usize]) -> Result<Self> {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| Linear::load(be, ws, &format!("{prefix}.layers.{i}"), d[0], d[1], true))
            .collect::<Result<_>>()?;
        Ok(Mlp { layers })
    }

    /// ReLU after every layer but the last.
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let n = self.layers.len();
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(be, &h, if i + 1 < n { Act::Relu } else { Act::None })?;
        }
        Ok(h)
    }
}
