//! Layers with explicit passes.
//!
//! Each layer owns its parameters as named backend tensors (field names follow the checkpoint
//! keys) and exposes `forward` and `backward`. The rule: the caller keeps what backward needs
//! (a layer's input, and an activation's input); parameter gradients accumulate into [`Grads`]
//! (`+=`, and only for trainable parameters, so frozen weights cost no gradient GEMM);
//! activation gradients are returned as fresh tensors.

pub mod grads;

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::weights::WeightStore;

pub use grads::{Grads, Param, ParamList, Trainable};

/// `y = act(x W^T + b)`, PyTorch's `nn.Linear`.
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: Option<B::Tensor>,
    /// Checkpoint prefix (`{name}.weight`, `{name}.bias`).
    pub name: String,
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
        Ok(Linear {
            weight,
            bias,
            name: prefix.to_string(),
        })
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
    /// Checkpoint prefix.
    pub name: String,
}

impl<B: Backend> LayerNorm<B> {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[c]`.
    pub fn load(be: &B, ws: &mut WeightStore, prefix: &str, c: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: be.upload(&ws.take(&format!("{prefix}.weight"), &[c])?)?,
            bias: be.upload(&ws.take(&format!("{prefix}.bias"), &[c])?)?,
            eps,
            name: prefix.to_string(),
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
    /// Checkpoint prefix.
    pub name: String,
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
            name: prefix.to_string(),
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
    /// Checkpoint prefix.
    pub name: String,
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
            name: prefix.to_string(),
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

// ----- backward -----------------------------------------------------------------------------

/// Unwraps an input gradient that was asked for (`need_dx = true` always yields one).
pub(crate) fn dx<T>(v: Option<T>) -> Result<T> {
    v.ok_or_else(|| crate::Error::shape("backward", String::from("input gradient missing")))
}

impl<B: Backend> Linear<B> {
    /// Whether any of this layer's parameters is trained.
    pub fn trained(&self, grads: &Grads<B>) -> bool {
        self.param_names().iter().any(|n| grads.wants(n))
    }

    /// Parameter names.
    pub fn param_names(&self) -> Vec<String> {
        let mut v = vec![format!("{}.weight", self.name)];
        if self.bias.is_some() {
            v.push(format!("{}.bias", self.name));
        }
        v
    }

    /// Appends this layer's parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        out.push((
            format!("{}.weight", self.name),
            Param::Dev(&mut self.weight),
        ));
        if let Some(b) = &mut self.bias {
            out.push((format!("{}.bias", self.name), Param::Dev(b)));
        }
    }

    /// Forward that also returns the pre-activation output (needed by GELU's backward) when
    /// `act` is not the identity: `(y, pre)`.
    pub fn forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
        act: Act,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        match act {
            Act::None => Ok((self.forward(be, x, Act::None)?, None)),
            // ReLU's derivative is readable from its output; keep the fused epilogue.
            Act::Relu => Ok((self.forward(be, x, Act::Relu)?, None)),
            Act::Gelu => {
                let pre = self.forward(be, x, Act::None)?;
                Ok((be.activate(&pre, Act::Gelu)?, Some(pre)))
            }
        }
    }

    /// Backward of [`Linear::forward_t`]: `x` the input, `y`/`pre` what forward returned, `dy`
    /// the output gradient. Returns `dx` when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        x: &B::Tensor,
        y: &B::Tensor,
        pre: Option<&B::Tensor>,
        act: Act,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
        need_dx: bool,
    ) -> Result<Option<B::Tensor>> {
        let dpre = match act {
            Act::None => dy.clone(),
            Act::Relu => be.activate_backward(y, dy, Act::Relu)?,
            Act::Gelu => {
                let pre = pre.ok_or_else(|| {
                    crate::Error::shape("Linear::backward", String::from("GELU needs its input"))
                })?;
                be.activate_backward(pre, dy, Act::Gelu)?
            }
        };
        self.backward_pre(be, x, &dpre, grads, need_dx)
    }

    /// Backward from the gradient of the pre-activation output.
    pub fn backward_pre(
        &self,
        be: &B,
        x: &B::Tensor,
        dpre: &B::Tensor,
        grads: &mut Grads<B>,
        need_dx: bool,
    ) -> Result<Option<B::Tensor>> {
        let wn = format!("{}.weight", self.name);
        let bn = format!("{}.bias", self.name);
        let want_w = grads.wants(&wn);
        let want_b = self.bias.is_some() && grads.wants(&bn);
        if want_w {
            let (dw, db) = be.linear_backward_weight(x, dpre, want_b)?;
            grads.accum(be, &wn, dw)?;
            if let Some(db) = db {
                grads.accum(be, &bn, db)?;
            }
        } else if want_b {
            let n = be.dims(&self.weight)[0];
            grads.accum(be, &bn, be.sum_rows(dpre, n)?)?;
        }
        if need_dx {
            Ok(Some(be.linear_backward_input(dpre, &self.weight)?))
        } else {
            Ok(None)
        }
    }
}

impl<B: Backend> LayerNorm<B> {
    /// Appends this layer's parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        out.push((
            format!("{}.weight", self.name),
            Param::Dev(&mut self.weight),
        ));
        out.push((format!("{}.bias", self.name), Param::Dev(&mut self.bias)));
    }

    /// `dx` given the input `x` and the output gradient.
    pub fn backward(
        &self,
        be: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let (dx, dg, db) = be.layer_norm_backward(x, &self.weight, dy, self.eps)?;
        grads.accum(be, &format!("{}.weight", self.name), dg)?;
        grads.accum(be, &format!("{}.bias", self.name), db)?;
        Ok(dx)
    }
}

impl<B: Backend> Conv2d<B> {
    /// Appends this layer's parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        out.push((
            format!("{}.weight", self.name),
            Param::Dev(&mut self.weight),
        ));
        if let Some(b) = &mut self.bias {
            out.push((format!("{}.bias", self.name), Param::Dev(b)));
        }
    }

    /// Accumulates the weight gradients and returns `dx` when `need_dx`.
    pub fn backward(
        &self,
        be: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
        need_dx: bool,
    ) -> Result<Option<B::Tensor>> {
        let wn = format!("{}.weight", self.name);
        let bn = format!("{}.bias", self.name);
        let want_b = self.bias.is_some() && grads.wants(&bn);
        if !need_dx && !grads.wants(&wn) && !want_b {
            return Ok(None);
        }
        let (dx, dw, db) =
            be.conv2d_backward(x, &self.weight, dy, self.stride, self.pad, need_dx, want_b)?;
        grads.accum(be, &wn, dw)?;
        if let Some(db) = db {
            grads.accum(be, &bn, db)?;
        }
        Ok(dx)
    }
}

impl<B: Backend> ConvTranspose2x2<B> {
    /// Appends this layer's parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        out.push((
            format!("{}.weight", self.name),
            Param::Dev(&mut self.weight),
        ));
        out.push((format!("{}.bias", self.name), Param::Dev(&mut self.bias)));
    }

    /// Accumulates the weight gradients and returns `dx`.
    pub fn backward(
        &self,
        be: &B,
        x: &B::Tensor,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let (dx, dw, db) = be.conv_transpose2x2_backward(x, &self.weight, dy)?;
        grads.accum(be, &format!("{}.weight", self.name), dw)?;
        grads.accum(be, &format!("{}.bias", self.name), db)?;
        Ok(dx)
    }
}

/// What [`Mlp::forward_t`] keeps: each layer's input and the final output.
pub struct MlpCache<T> {
    /// Input of layer i (index 0 is the MLP input); the last entry is the output.
    pub acts: Vec<T>,
}

impl<B: Backend> Mlp<B> {
    /// Appends this MLP's parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        for l in &mut self.layers {
            l.params(out);
        }
    }

    /// Forward keeping every layer's input.
    pub fn forward_t(&self, be: &B, x: &B::Tensor) -> Result<MlpCache<B::Tensor>> {
        let n = self.layers.len();
        let mut acts = vec![x.clone()];
        for (i, l) in self.layers.iter().enumerate() {
            let a = if i + 1 < n { Act::Relu } else { Act::None };
            let y = l.forward(be, &acts[i], a)?;
            acts.push(y);
        }
        Ok(MlpCache { acts })
    }

    /// Backward of [`Mlp::forward_t`]; returns `dx` when `need_dx`.
    pub fn backward(
        &self,
        be: &B,
        c: &MlpCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
        need_dx: bool,
    ) -> Result<Option<B::Tensor>> {
        let n = self.layers.len();
        let mut g = dy.clone();
        for i in (0..n).rev() {
            let act = if i + 1 < n { Act::Relu } else { Act::None };
            let need = need_dx || i > 0;
            match self.layers[i].backward(
                be,
                &c.acts[i],
                &c.acts[i + 1],
                None,
                act,
                &g,
                grads,
                need,
            )? {
                Some(d) => g = d,
                None => return Ok(None),
            }
        }
        Ok(Some(g))
    }
}
