//! TinyViT's convolutional parts: `Conv2d_BN` (its BatchNorm folded in), MBConv and
//! PatchMerging.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::nn::dx;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

use super::BN_EPS;

/// A convolution with its BatchNorm folded in (`Conv2d_BN`).
pub struct ConvBn<B: Backend> {
    /// `[out, in / groups, k, k]` (folded).
    pub weight: B::Tensor,
    /// `[out]` (folded).
    pub bias: B::Tensor,
    /// The weight as a `[out, in]` linear layer when the conv is 1x1, stride 1, unpadded.
    pub pointwise: Option<B::Tensor>,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Symmetric zero padding.
    pub pad: usize,
    /// Depthwise (`groups = channels`).
    pub depthwise: bool,
    /// Checkpoint prefix (`{name}.c.weight`, `{name}.bn.*`).
    pub name: String,
}

impl<B: Backend> ConvBn<B> {
    /// Loads `{prefix}.c.weight` and `{prefix}.bn.*` and folds them.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        depthwise: bool,
    ) -> Result<Self> {
        let per = if depthwise { 1 } else { cin };
        let w = ws.take(&format!("{prefix}.c.weight"), &[cout, per, k, k])?;
        let g = ws.take(&format!("{prefix}.bn.weight"), &[cout])?;
        let beta = ws.take(&format!("{prefix}.bn.bias"), &[cout])?;
        let mean = ws.take(&format!("{prefix}.bn.running_mean"), &[cout])?;
        let var = ws.take(&format!("{prefix}.bn.running_var"), &[cout])?;
        let mut fw = w.data().to_vec();
        let mut fb = vec![0.0f32; cout];
        let n = per * k * k;
        for o in 0..cout {
            let s = g.data()[o] / (var.data()[o] + BN_EPS).sqrt();
            for v in &mut fw[o * n..(o + 1) * n] {
                *v *= s;
            }
            fb[o] = beta.data()[o] - mean.data()[o] * s;
        }
        let weight = Tensor::from_vec(fw, &[cout, per, k, k])?;
        let pointwise = if k == 1 && stride == 1 && pad == 0 && !depthwise {
            Some(be.upload(&weight.reshape(&[cout, cin])?)?)
        } else {
            None
        };
        Ok(ConvBn {
            weight: be.upload(&weight)?,
            bias: be.upload(&Tensor::from_vec(fb, &[cout])?)?,
            pointwise,
            k,
            stride,
            pad,
            depthwise,
            name: prefix.to_string(),
        })
    }

    /// `x` `[B, H, W, in]` -> `[B, Ho, Wo, out]`, then `act`.
    pub fn forward(&self, be: &B, x: &B::Tensor, act: Act) -> Result<B::Tensor> {
        if let Some(w) = &self.pointwise {
            return be.linear(x, w, Some(&self.bias), act);
        }
        let y = if self.depthwise {
            be.depthwise_conv2d(x, &self.weight, Some(&self.bias), self.stride, self.pad)?
        } else {
            be.conv2d(x, &self.weight, Some(&self.bias), self.stride, self.pad)?
        };
        match act {
            Act::None => Ok(y),
            a => be.activate(&y, a),
        }
    }

    /// The input gradient given the output gradient (before any activation).
    pub fn backward_dx(&self, be: &B, x: &B::Tensor, dy: &B::Tensor) -> Result<B::Tensor> {
        if let Some(w) = &self.pointwise {
            return be.linear_backward_input(dy, w);
        }
        if self.depthwise {
            let (g, _, _) = be.depthwise_conv2d_backward(
                x,
                &self.weight,
                dy,
                self.stride,
                self.pad,
                true,
                false,
                false,
            )?;
            dx(g)
        } else {
            let (g, _, _) =
                be.conv2d_backward(x, &self.weight, dy, self.stride, self.pad, true, false)?;
            dx(g)
        }
    }
}

/// MBConv: `gelu(conv3(gelu(conv2(gelu(conv1(x))))) + x)`, conv2 depthwise 3x3.
pub struct MbConv<B: Backend> {
    /// 1x1 expand.
    pub conv1: ConvBn<B>,
    /// Depthwise 3x3.
    pub conv2: ConvBn<B>,
    /// 1x1 project.
    pub conv3: ConvBn<B>,
}

impl<B: Backend> MbConv<B> {
    pub(super) fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.conv1.forward(be, x, Act::Gelu)?;
        let h = self.conv2.forward(be, &h, Act::Gelu)?;
        let h = self.conv3.forward(be, &h, Act::None)?;
        let s = be.add_scaled(&h, 1.0, x, 1.0)?;
        be.activate(&s, Act::Gelu)
    }
}

/// PatchMerging: `conv3(gelu(conv2(gelu(conv1(x)))))`, conv2 depthwise 3x3 with the stage's
/// merge stride.
pub struct PatchMerging<B: Backend> {
    /// 1x1 to the next width.
    pub conv1: ConvBn<B>,
    /// Depthwise 3x3, stride 1 or 2.
    pub conv2: ConvBn<B>,
    /// 1x1.
    pub conv3: ConvBn<B>,
}

/// What [`PatchMerging`] keeps for backward.
pub struct MergeCache<T> {
    x: T,
    a1: T,
    g1: T,
    a2: T,
    g2: T,
}

impl<B: Backend> PatchMerging<B> {
    pub(super) fn forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
    ) -> Result<(B::Tensor, MergeCache<B::Tensor>)> {
        let a1 = self.conv1.forward(be, x, Act::None)?;
        let g1 = be.activate(&a1, Act::Gelu)?;
        let a2 = self.conv2.forward(be, &g1, Act::None)?;
        let g2 = be.activate(&a2, Act::Gelu)?;
        let y = self.conv3.forward(be, &g2, Act::None)?;
        Ok((
            y,
            MergeCache {
                x: x.clone(),
                a1,
                g1,
                a2,
                g2,
            },
        ))
    }

    pub(super) fn backward(
        &self,
        be: &B,
        c: &MergeCache<B::Tensor>,
        dy: &B::Tensor,
    ) -> Result<B::Tensor> {
        let g = self.conv3.backward_dx(be, &c.g2, dy)?;
        let g = be.activate_backward(&c.a2, &g, Act::Gelu)?;
        let g = self.conv2.backward_dx(be, &c.g1, &g)?;
        let g = be.activate_backward(&c.a1, &g, Act::Gelu)?;
        self.conv1.backward_dx(be, &c.x, &g)
    }
}
