//! The TinyViT image encoder (MobileSAM, LiteMedSAM) with Med-SA adapters (SPEC section 8).
//!
//! Shapes: images `[B, 3, H, W]` -> stem (two Conv2d_BN with GELU between) -> stage 0 (MBConv
//! blocks) -> PatchMerging -> attention stages (TinyViT blocks, each but the last ending with a
//! PatchMerging) -> neck -> embeddings `[B, C, H/s, W/s]` (`s` the total stride, 4 for
//! LiteMedSAM and 16 for MobileSAM). Maps are channels-last inside, as everywhere in the model.
//!
//! Every `Conv2d_BN` has its BatchNorm (inference statistics) folded into the convolution when
//! the weights load: `w' = w g / sqrt(var + eps)`, `b' = beta - mean g / sqrt(var + eps)`. The
//! base encoder is frozen in training (Med-SA trains adapters), so the unfolded form is never
//! needed; gradients flow through the folded convolutions to the adapters of earlier blocks.
//!
//! A block (with Med-SA's adapters where the checkpoint has them):
//! `x1 = x + crop(unpartition(Space_Adapter(proj(attn(qkv(norm(partition(x))))))))
//!       [+ Depth_Adapter(depth attention of x)]`,
//! `x2 = local_conv(x1)`, `y = x2 + fc2(gelu(fc1(mlp.norm(x2)))) [+ 0.5 MLP_Adapter(x2)]`.
//! Windows pad bottom/right with zeros before `norm` (padded tokens are attended to, as in the
//! reference code); a grid equal to the window is one window, which is what the reference's
//! unpartitioned path computes.

use crate::backend::{Act, Backend};
use crate::error::{Error, Result};
use crate::medsa::adapter::{Adapter, AdapterCache};
use crate::medsa::depth_branch;
use crate::nn::{dx, Grads, LayerNorm, Linear, Param, ParamList};
use crate::sam::config::{SamConfig, TinyBlockConfig, TinyStageConfig, TinyVitConfig};
use crate::sam::image_encoder::{DepthSpec, MLP_ADAPTER_SCALE};
use crate::sam::Trace;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// BatchNorm's epsilon in `Conv2d_BN`.
const BN_EPS: f32 = 1e-5;
/// `nn.LayerNorm`'s default epsilon (the attention's and the MLP's norms).
const LN_EPS: f32 = 1e-5;
/// LayerNorm2d's epsilon in the neck.
const NECK_EPS: f32 = 1e-6;

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
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
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
    fn forward_t(&self, be: &B, x: &B::Tensor) -> Result<(B::Tensor, MergeCache<B::Tensor>)> {
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

    fn backward(&self, be: &B, c: &MergeCache<B::Tensor>, dy: &B::Tensor) -> Result<B::Tensor> {
        let g = self.conv3.backward_dx(be, &c.g2, dy)?;
        let g = be.activate_backward(&c.a2, &g, Act::Gelu)?;
        let g = self.conv2.backward_dx(be, &c.g1, &g)?;
        let g = be.activate_backward(&c.a1, &g, Act::Gelu)?;
        self.conv1.backward_dx(be, &c.x, &g)
    }
}

/// TinyViT's attention: `proj(attn(qkv(norm(x))))` with the per-head bias table.
pub struct TinyAttention<B: Backend> {
    /// Pre-attention LayerNorm (inside the attention module in the checkpoint).
    pub norm: LayerNorm<B>,
    /// `C -> 3C`, laid out per head as `[q | k | v]`.
    pub qkv: Linear<B>,
    /// `C -> C`.
    pub proj: Linear<B>,
    /// `attention_biases` `[heads, w*w]`, host copy (the trained value when training it).
    pub table_host: Tensor,
    /// The same on the device.
    pub table: B::Tensor,
    /// Checkpoint key of the table.
    pub table_key: String,
    /// Heads.
    pub heads: usize,
    /// Window side.
    pub window: usize,
}

/// What [`TinyAttention`] keeps.
pub struct TinyAttnCache<T> {
    xw: T,
    xn: T,
    qkv: T,
    o: T,
}

impl<B: Backend> TinyAttention<B> {
    fn scale(&self, c: usize) -> f32 {
        ((c / self.heads) as f32).powf(-0.5)
    }

    /// `xw` `[N, L, C]` windows -> `[N, L, C]`.
    fn forward_t(&self, be: &B, xw: &B::Tensor) -> Result<(B::Tensor, TinyAttnCache<B::Tensor>)> {
        let c = be.dims(xw)[2];
        let xn = self.norm.forward(be, xw)?;
        let qkv = self.qkv.forward(be, &xn, Act::None)?;
        let o = be.attention_table(&qkv, self.window, self.heads, self.scale(c), &self.table)?;
        let y = self.proj.forward(be, &o, Act::None)?;
        Ok((
            y,
            TinyAttnCache {
                xw: xw.clone(),
                xn,
                qkv,
                o,
            },
        ))
    }

    fn backward(
        &self,
        be: &B,
        c: &TinyAttnCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let ch = be.dims(dy)[2];
        let d_o = dx(self.proj.backward_pre(be, &c.o, dy, grads, true)?)?;
        let want_table = grads.wants(&self.table_key);
        let (dqkv, dt) = be.attention_table_backward(
            &c.qkv,
            &self.table,
            &d_o,
            self.window,
            self.heads,
            self.scale(ch),
            want_table,
        )?;
        if let Some(dt) = dt {
            grads.accum(be, &self.table_key, dt)?;
        }
        let dxn = dx(self.qkv.backward_pre(be, &c.xn, &dqkv, grads, true)?)?;
        self.norm.backward(be, &c.xw, &dxn, grads)
    }

    /// Depth attention (SD-Trans on TinyViT): `x` `[n, d, C]` (each row a token's slices) ->
    /// `proj(attn(qkv(norm(x))))` with no position bias.
    fn depth_forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
    ) -> Result<(B::Tensor, DepthAttnCache<B::Tensor>)> {
        let s = be.dims(x).to_vec();
        let (n, d, c) = (s[0], s[1], s[2]);
        let xn = self.norm.forward(be, x)?;
        let qkv = self.qkv.forward(be, &xn, Act::None)?;
        let (q, k, v) = split_heads(be, &qkv, self.heads)?;
        let o = be.attention(&q, &k, &v, self.heads, self.scale(c), None)?;
        let y = self.proj.forward(be, &o, Act::None)?;
        let _ = (n, d);
        Ok((
            y,
            DepthAttnCache {
                x: x.clone(),
                xn,
                q,
                k,
                v,
                o,
            },
        ))
    }

    fn depth_backward(
        &self,
        be: &B,
        c: &DepthAttnCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let s = be.dims(dy).to_vec();
        let (n, d, ch) = (s[0], s[1], s[2]);
        let d_o = dx(self.proj.backward_pre(be, &c.o, dy, grads, true)?)?;
        let g = be.attention_backward(
            &c.q,
            &c.k,
            &c.v,
            &c.o,
            &d_o,
            self.heads,
            self.scale(ch),
            None,
        )?;
        let hd = ch / self.heads;
        let four = |t: &B::Tensor| be.reshape(t, &[n, d, self.heads, hd]);
        let dqkv = be.concat(&[&four(&g.dq)?, &four(&g.dk)?, &four(&g.dv)?], 3)?;
        let dqkv = be.reshape(&dqkv, &[n, d, 3 * ch])?;
        let dxn = dx(self.qkv.backward_pre(be, &c.xn, &dqkv, grads, true)?)?;
        self.norm.backward(be, &c.x, &dxn, grads)
    }
}

/// What the depth attention keeps.
pub struct DepthAttnCache<T> {
    x: T,
    xn: T,
    q: T,
    k: T,
    v: T,
    o: T,
}

/// TinyViT's per-head `[q | k | v]` projection `[n, l, 3C]` -> SAM-layout `q`, `k`, `v`
/// `[n, l, C]` (heads interleaved, as [`Backend::attention`] reads them).
fn split_heads<B: Backend>(
    be: &B,
    qkv: &B::Tensor,
    heads: usize,
) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
    let s = be.dims(qkv).to_vec();
    let (n, l, c3) = (s[0], s[1], s[2]);
    let hd = c3 / (3 * heads);
    let q4 = be.reshape(qkv, &[n, l, heads, 3 * hd])?;
    let part = |i: usize| -> Result<B::Tensor> {
        let p = be.narrow(&q4, 3, i * hd, hd)?;
        be.reshape(&p, &[n, l, heads * hd])
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// One TinyViT block with the Med-SA adapters its checkpoint has.
pub struct TinyBlock<B: Backend> {
    /// Which adapters exist.
    pub cfg: TinyBlockConfig,
    /// Attention.
    pub attn: TinyAttention<B>,
    /// Depthwise conv between attention and MLP.
    pub local_conv: ConvBn<B>,
    /// The MLP's own LayerNorm.
    pub mlp_norm: LayerNorm<B>,
    /// MLP first layer (GELU).
    pub fc1: Linear<B>,
    /// MLP second layer.
    pub fc2: Linear<B>,
    /// After the attention (with skip).
    pub space_adapter: Option<Adapter<B>>,
    /// Parallel to the MLP (no skip, scale 0.5).
    pub mlp_adapter: Option<Adapter<B>>,
    /// SD-Trans depth adapter (no skip).
    pub depth_adapter: Option<Adapter<B>>,
}

/// What [`TinyBlock::forward_t`] keeps.
pub struct TinyBlockCache<T> {
    attn: TinyAttnCache<T>,
    space: Option<AdapterCache<T>>,
    depth: Option<(DepthAttnCache<T>, AdapterCache<T>, usize)>,
    x1: T,
    x2: T,
    hn: T,
    h: T,
    pre: Option<T>,
    mlp_adapter: Option<AdapterCache<T>>,
    hw: (usize, usize),
    c: usize,
}

impl<B: Backend> TinyBlock<B> {
    fn load(
        be: &B,
        ws: &mut WeightStore,
        p: &str,
        st: &TinyStageConfig,
        cfg: &TinyBlockConfig,
    ) -> Result<Self> {
        let c = st.width;
        let table_key = format!("{p}.attn.attention_biases");
        let table_host = ws.take(&table_key, &[st.heads, st.window * st.window])?;
        let lk = st.local_conv;
        Ok(TinyBlock {
            cfg: cfg.clone(),
            attn: TinyAttention {
                norm: LayerNorm::load(be, ws, &format!("{p}.attn.norm"), c, LN_EPS)?,
                qkv: Linear::load(be, ws, &format!("{p}.attn.qkv"), c, 3 * c, true)?,
                proj: Linear::load(be, ws, &format!("{p}.attn.proj"), c, c, true)?,
                table: be.upload(&table_host)?,
                table_host,
                table_key,
                heads: st.heads,
                window: st.window,
            },
            local_conv: ConvBn::load(
                be,
                ws,
                &format!("{p}.local_conv"),
                c,
                c,
                lk,
                1,
                lk / 2,
                true,
            )?,
            mlp_norm: LayerNorm::load(be, ws, &format!("{p}.mlp.norm"), c, LN_EPS)?,
            fc1: Linear::load(be, ws, &format!("{p}.mlp.fc1"), c, st.hidden, true)?,
            fc2: Linear::load(be, ws, &format!("{p}.mlp.fc2"), st.hidden, c, true)?,
            space_adapter: Adapter::load_opt(be, ws, &format!("{p}.Space_Adapter"), c, true)?,
            mlp_adapter: Adapter::load_opt(be, ws, &format!("{p}.MLP_Adapter"), c, false)?,
            depth_adapter: Adapter::load_opt(be, ws, &format!("{p}.Depth_Adapter"), c, false)?,
        })
    }

    /// Every parameter name (the folded `local_conv` is not a parameter: the base is frozen).
    pub fn param_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for ln in [&self.attn.norm, &self.mlp_norm] {
            v.push(format!("{}.weight", ln.name));
            v.push(format!("{}.bias", ln.name));
        }
        for l in [&self.attn.qkv, &self.attn.proj, &self.fc1, &self.fc2] {
            v.extend(l.param_names());
        }
        v.push(self.attn.table_key.clone());
        for a in [&self.space_adapter, &self.mlp_adapter, &self.depth_adapter]
            .into_iter()
            .flatten()
        {
            v.extend(a.fc1.param_names());
            v.extend(a.fc2.param_names());
        }
        v
    }

    fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.attn.norm.params(out);
        self.attn.qkv.params(out);
        self.attn.proj.params(out);
        out.push((
            self.attn.table_key.clone(),
            Param::Host(&mut self.attn.table_host),
        ));
        self.mlp_norm.params(out);
        self.fc1.params(out);
        self.fc2.params(out);
        for a in [
            &mut self.space_adapter,
            &mut self.mlp_adapter,
            &mut self.depth_adapter,
        ]
        .into_iter()
        .flatten()
        {
            a.params(out);
        }
    }

    /// `x` `[B, H, W, C]` -> `[B, H, W, C]`, keeping what backward needs.
    pub fn forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<(B::Tensor, TinyBlockCache<B::Tensor>)> {
        let s = be.dims(x).to_vec();
        let (h, w, c) = (s[1], s[2], s[3]);
        let ws = self.attn.window;
        let xw = be.window_partition(x, ws)?;
        let nw = be.dims(&xw)[0];
        let xw = be.reshape(&xw, &[nw, ws * ws, c])?;
        let (mut a, attn) = self.attn.forward_t(be, &xw)?;
        let mut space = None;
        if let Some(sa) = &self.space_adapter {
            let (y, sc) = sa.forward_t(be, &a)?;
            a = y;
            space = Some(sc);
        }
        let a = be.reshape(&a, &[nw, ws, ws, c])?;
        let a = be.window_unpartition(&a, ws, (h, w))?;
        let mut x1 = be.add_scaled(x, 1.0, &a, 1.0)?;
        let mut dcache = None;
        if let (Some(da), Some(spec)) = (&self.depth_adapter, depth) {
            let xd = depth_branch::to_depth_major(be, x, spec.d)?;
            let (yd, ac) = self.attn.depth_forward_t(be, &xd)?;
            let (yd, adc) = da.forward_t(be, &yd)?;
            let yd = depth_branch::from_depth_major(be, &yd, spec.d, (h, w))?;
            x1 = be.add_scaled(&x1, 1.0, &yd, 1.0)?;
            dcache = Some((ac, adc, spec.d));
        }
        let x2 = self.local_conv.forward(be, &x1, Act::None)?;
        let hn = self.mlp_norm.forward(be, &x2)?;
        let (hm, pre) = self.fc1.forward_t(be, &hn, Act::Gelu)?;
        let m = self.fc2.forward(be, &hm, Act::None)?;
        let mut y = be.add_scaled(&x2, 1.0, &m, 1.0)?;
        let mut mlp_adapter = None;
        if let Some(ma) = &self.mlp_adapter {
            let (ya, mc) = ma.forward_t(be, &x2)?;
            y = be.add_scaled(&y, 1.0, &ya, MLP_ADAPTER_SCALE)?;
            mlp_adapter = Some(mc);
        }
        Ok((
            y,
            TinyBlockCache {
                attn,
                space,
                depth: dcache,
                x1,
                x2,
                hn,
                h: hm,
                pre,
                mlp_adapter,
                hw: (h, w),
                c,
            },
        ))
    }

    /// `dx` given the block's output gradient.
    pub fn backward(
        &self,
        be: &B,
        cache: &TinyBlockCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let (h, w) = cache.hw;
        let c = cache.c;
        let ws = self.attn.window;
        // y = x2 + fc2(gelu(fc1(norm(x2)))) + 0.5 * MLP_Adapter(x2).
        let dhm = dx(self.fc2.backward_pre(be, &cache.h, dy, grads, true)?)?;
        let dhn = dx(self.fc1.backward(
            be,
            &cache.hn,
            &cache.h,
            cache.pre.as_ref(),
            Act::Gelu,
            &dhm,
            grads,
            true,
        )?)?;
        let mut dx2 = self.mlp_norm.backward(be, &cache.x2, &dhn, grads)?;
        dx2 = be.add_scaled(&dx2, 1.0, dy, 1.0)?;
        if let (Some(ma), Some(mc)) = (&self.mlp_adapter, &cache.mlp_adapter) {
            let g = be.add_scaled(dy, MLP_ADAPTER_SCALE, dy, 0.0)?;
            let da = ma.backward(be, mc, &g, grads)?;
            dx2 = be.add_scaled(&dx2, 1.0, &da, 1.0)?;
        }
        let dx1 = self.local_conv.backward_dx(be, &cache.x1, &dx2)?;
        // x1 = x + unpartition(a) (+ depth branch of x).
        let mut dxin = dx1.clone();
        if let (Some(da), Some((ac, adc, d))) = (&self.depth_adapter, &cache.depth) {
            let g = depth_branch::to_depth_major(be, &dx1, *d)?;
            let g = da.backward(be, adc, &g, grads)?;
            let g = self.attn.depth_backward(be, ac, &g, grads)?;
            let g = depth_branch::from_depth_major(be, &g, *d, (h, w))?;
            dxin = be.add_scaled(&dxin, 1.0, &g, 1.0)?;
        }
        // unpartition crops the padding; its adjoint partitions with zero padding.
        let da = be.window_partition(&dx1, ws)?;
        let nw = be.dims(&da)[0];
        let da = be.reshape(&da, &[nw, ws * ws, c])?;
        let da = match (&self.space_adapter, &cache.space) {
            (Some(sa), Some(sc)) => sa.backward(be, sc, &da, grads)?,
            _ => da,
        };
        let dxw = self.attn.backward(be, &cache.attn, &da, grads)?;
        let dxw = be.reshape(&dxw, &[nw, ws, ws, c])?;
        let dpart = be.window_unpartition(&dxw, ws, (h, w))?;
        be.add_scaled(&dxin, 1.0, &dpart, 1.0)
    }
}

/// A stage: its blocks and the PatchMerging that ends it.
pub struct TinyStage<B: Backend> {
    /// MBConv blocks (stage 0).
    pub mbconv: Vec<MbConv<B>>,
    /// TinyViT blocks (later stages).
    pub blocks: Vec<TinyBlock<B>>,
    /// The downsample at the end of the stage.
    pub merge: Option<PatchMerging<B>>,
}

/// The TinyViT image encoder.
pub struct TinyVit<B: Backend> {
    /// Configuration.
    pub cfg: TinyVitConfig,
    /// Stem convolutions (GELU between).
    pub stem: [ConvBn<B>; 2],
    /// Stages.
    pub stages: Vec<TinyStage<B>>,
    /// Neck 1x1 conv as a linear layer `[C, D]`, no bias.
    pub neck_conv1: Linear<B>,
    /// Neck LayerNorm2d.
    pub neck_norm1: LayerNorm<B>,
    /// Neck 3x3 conv, no bias.
    pub neck_conv2: crate::nn::Conv2d<B>,
    /// Neck LayerNorm2d.
    pub neck_norm2: LayerNorm<B>,
}

/// A block's saved state in training.
enum Saved<T> {
    Merge(MergeCache<T>),
    Block(Box<TinyBlockCache<T>>),
}

/// What [`TinyVit::forward_t`] keeps: the saved steps from the first trained block on, in
/// execution order, and the neck's inputs.
pub struct TinyVitCache<T> {
    saved: Vec<Saved<T>>,
    x_last: T,
    y1: T,
    y1n: T,
    y2: T,
}

/// Keys the encoder never reads: BatchNorm's step counters (integers) and MobileSAM's
/// ImageNet classifier head.
fn unused_key(k: &str) -> bool {
    k.starts_with("image_encoder.")
        && (k.ends_with(".num_batches_tracked")
            || k.starts_with("image_encoder.norm_head.")
            || k.starts_with("image_encoder.head."))
}

impl<B: Backend> TinyVit<B> {
    /// Loads `image_encoder.*` for the configuration `cfg.tiny_vit`.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        let t = cfg
            .tiny_vit
            .clone()
            .ok_or_else(|| Error::shape("TinyVit::load", String::from("not a TinyViT config")))?;
        ws.skip(unused_key);
        let (k, s, p) = t.patch_embed.geometry();
        let w0 = t.stages[0].width;
        let stem = [
            ConvBn::load(
                be,
                ws,
                "image_encoder.patch_embed.seq.0",
                3,
                w0 / 2,
                k,
                s,
                p,
                false,
            )?,
            ConvBn::load(
                be,
                ws,
                "image_encoder.patch_embed.seq.2",
                w0 / 2,
                w0,
                k,
                s,
                p,
                false,
            )?,
        ];
        let mut stages = Vec::with_capacity(t.stages.len());
        for (si, st) in t.stages.iter().enumerate() {
            let pre = format!("image_encoder.layers.{si}");
            let c = st.width;
            let mut stage = TinyStage {
                mbconv: Vec::new(),
                blocks: Vec::new(),
                merge: None,
            };
            for (j, bc) in st.blocks.iter().enumerate() {
                let p = format!("{pre}.blocks.{j}");
                if st.is_conv() {
                    let hdn = st.hidden;
                    stage.mbconv.push(MbConv {
                        conv1: ConvBn::load(be, ws, &format!("{p}.conv1"), c, hdn, 1, 1, 0, false)?,
                        conv2: ConvBn::load(
                            be,
                            ws,
                            &format!("{p}.conv2"),
                            hdn,
                            hdn,
                            3,
                            1,
                            1,
                            true,
                        )?,
                        conv3: ConvBn::load(be, ws, &format!("{p}.conv3"), hdn, c, 1, 1, 0, false)?,
                    });
                } else {
                    stage.blocks.push(TinyBlock::load(be, ws, &p, st, bc)?);
                }
            }
            if let Some(ms) = st.merge_stride {
                let n = t.stages[si + 1].width;
                let p = format!("{pre}.downsample");
                stage.merge = Some(PatchMerging {
                    conv1: ConvBn::load(be, ws, &format!("{p}.conv1"), c, n, 1, 1, 0, false)?,
                    conv2: ConvBn::load(be, ws, &format!("{p}.conv2"), n, n, 3, ms, 1, true)?,
                    conv3: ConvBn::load(be, ws, &format!("{p}.conv3"), n, n, 1, 1, 0, false)?,
                });
            }
            stages.push(stage);
        }
        let d = t.stages.last().map(|s| s.width).unwrap_or(0);
        let oc = cfg.out_chans;
        let neck_w = ws.take("image_encoder.neck.0.weight", &[oc, d, 1, 1])?;
        Ok(TinyVit {
            stem,
            stages,
            neck_conv1: Linear {
                weight: be.upload(&neck_w.reshape(&[oc, d])?)?,
                bias: None,
                name: "image_encoder.neck.0".into(),
            },
            neck_norm1: LayerNorm::load(be, ws, "image_encoder.neck.1", oc, NECK_EPS)?,
            neck_conv2: crate::nn::Conv2d::load(
                be,
                ws,
                "image_encoder.neck.2",
                oc,
                oc,
                3,
                1,
                1,
                false,
            )?,
            neck_norm2: LayerNorm::load(be, ws, "image_encoder.neck.3", oc, NECK_EPS)?,
            cfg: t,
        })
    }

    /// The output token grid of `images`, or an error naming what is wrong with the batch.
    pub fn check_input(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<(usize, usize)> {
        let s = be.dims(images).to_vec();
        let stride = self.cfg.stride();
        let grid = (s.len() == 4 && s[1] == 3)
            .then(|| self.cfg.output_grid(s[2], s[3]))
            .flatten();
        let Some(grid) = grid else {
            return Err(Error::Input(format!(
                "images have shape {s:?}; expected [B, 3, H, W] with H and W positive multiples of {stride} (the TinyViT encoder's stride)"
            )));
        };
        if let Some(spec) = depth {
            if spec.d == 0 || s[0] % spec.d != 0 {
                return Err(Error::Input(format!(
                    "a batch of {} images is not a whole number of {}-slice volumes",
                    s[0], spec.d
                )));
            }
        }
        Ok(grid)
    }

    /// Appends the trainable parameters (adapters, the attention and MLP layers and norms, the
    /// bias tables and the neck; the folded convolutions are frozen).
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        for st in &mut self.stages {
            for b in &mut st.blocks {
                b.params(out);
            }
        }
        self.neck_conv1.params(out);
        self.neck_norm1.params(out);
        self.neck_conv2.params(out);
        self.neck_norm2.params(out);
    }

    /// Re-uploads host parameters (the bias tables) after an update.
    pub fn refresh_caches(&mut self, be: &B) -> Result<()> {
        for st in &mut self.stages {
            for b in &mut st.blocks {
                b.attn.table = be.upload(&b.attn.table_host)?;
            }
        }
        Ok(())
    }

    /// `(stage, block)` of the first attention block with a trained parameter.
    fn first_trained(&self, grads: &Grads<B>) -> Option<(usize, usize)> {
        for (si, st) in self.stages.iter().enumerate() {
            for (j, b) in st.blocks.iter().enumerate() {
                if b.param_names().iter().any(|n| grads.wants(n)) {
                    return Some((si, j));
                }
            }
        }
        None
    }

    fn neck_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for n in [
            &self.neck_conv1.name,
            &self.neck_norm1.name,
            &self.neck_conv2.name,
            &self.neck_norm2.name,
        ] {
            v.push(format!("{n}.weight"));
            v.push(format!("{n}.bias"));
        }
        v
    }

    /// Whether any encoder parameter is trained.
    pub fn any_trained(&self, grads: &Grads<B>) -> bool {
        self.first_trained(grads).is_some() || self.neck_names().iter().any(|n| grads.wants(n))
    }

    /// The encoder's one forward: steps before the first trained block keep nothing, later ones
    /// keep their caches for [`TinyVit::backward`].
    pub fn run(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        grads: Option<&Grads<B>>,
        trace: &mut Trace<B>,
    ) -> Result<(B::Tensor, TinyVitCache<B::Tensor>)> {
        self.check_input(be, images, depth)?;
        let first = grads.and_then(|g| self.first_trained(g));
        let x0 = be.permute(images, &[0, 2, 3, 1])?;
        let x = self.stem[0].forward(be, &x0, Act::Gelu)?;
        let mut x = self.stem[1].forward(be, &x, Act::None)?;
        trace.record(be, "enc.patch_embed", &x);
        let mut saved = Vec::new();
        let mut keeping = false;
        for (si, st) in self.stages.iter().enumerate() {
            for m in &st.mbconv {
                x = m.forward(be, &x)?;
            }
            for (j, b) in st.blocks.iter().enumerate() {
                keeping |= first == Some((si, j));
                if keeping {
                    let (y, c) = b.forward_t(be, &x, depth)?;
                    saved.push(Saved::Block(Box::new(c)));
                    x = y;
                } else {
                    x = b.forward_t(be, &x, depth)?.0;
                }
            }
            if let Some(m) = &st.merge {
                let (y, c) = m.forward_t(be, &x)?;
                if keeping {
                    saved.push(Saved::Merge(c));
                }
                x = y;
            }
            trace.record_with(be, || format!("enc.layers.{si}"), &x);
        }
        let y1 = self.neck_conv1.forward(be, &x, Act::None)?;
        let y1n = self.neck_norm1.forward(be, &y1)?;
        let y2 = self.neck_conv2.forward(be, &y1n)?;
        let y = self.neck_norm2.forward(be, &y2)?;
        let out = be.permute(&y, &[0, 3, 1, 2])?;
        Ok((
            out,
            TinyVitCache {
                saved,
                x_last: x,
                y1,
                y1n,
                y2,
            },
        ))
    }

    /// Accumulates the encoder's parameter gradients given `d(embeddings)` `[B, C, h, w]`.
    pub fn backward(
        &self,
        be: &B,
        c: &TinyVitCache<B::Tensor>,
        demb: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<()> {
        let dy = be.permute(demb, &[0, 2, 3, 1])?;
        let g = self.neck_norm2.backward(be, &c.y2, &dy, grads)?;
        let g = dx(self.neck_conv2.backward(be, &c.y1n, &g, grads, true)?)?;
        let g = self.neck_norm1.backward(be, &c.y1, &g, grads)?;
        let Some(mut g) =
            self.neck_conv1
                .backward_pre(be, &c.x_last, &g, grads, !c.saved.is_empty())?
        else {
            return Ok(());
        };
        // The saved steps in reverse; merges and blocks interleave as they ran.
        let mut steps: Vec<(&Saved<B::Tensor>, Step<'_, B>)> = Vec::new();
        {
            let mut it = c.saved.iter();
            let first = self.first_trained(grads);
            let mut keeping = false;
            for (si, st) in self.stages.iter().enumerate() {
                for (j, b) in st.blocks.iter().enumerate() {
                    keeping |= first == Some((si, j));
                    if keeping {
                        steps.push((it.next().ok_or_else(missing)?, Step::Block(b)));
                    }
                }
                if let (true, Some(m)) = (keeping, &st.merge) {
                    steps.push((it.next().ok_or_else(missing)?, Step::Merge(m)));
                }
            }
        }
        for (s, step) in steps.into_iter().rev() {
            g = match (s, step) {
                (Saved::Block(bc), Step::Block(b)) => b.backward(be, bc, &g, grads)?,
                (Saved::Merge(mc), Step::Merge(m)) => m.backward(be, mc, &g)?,
                _ => return Err(missing()),
            };
        }
        Ok(())
    }
}

/// A step that backward walks through.
enum Step<'a, B: Backend> {
    Block(&'a TinyBlock<B>),
    Merge(&'a PatchMerging<B>),
}

fn missing() -> Error {
    Error::shape(
        "TinyVit::backward",
        String::from("the saved steps do not match the trained blocks"),
    )
}
