//! The TinyViT block: the attention with its per-head bias table, the depth attention (SD-Trans)
//! and the MLP, with the Med-SA adapters the checkpoint has.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::medsa::adapter::{Adapter, AdapterCache};
use crate::medsa::depth_branch;
use crate::nn::{dx, Grads, LayerNorm, Linear, Param, ParamList};
use crate::sam::config::{TinyBlockConfig, TinyStageConfig};
use crate::sam::image_encoder::{DepthSpec, MLP_ADAPTER_SCALE};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

use super::layers::ConvBn;
use super::LN_EPS;

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
    pub(super) fn scale(&self, c: usize) -> f32 {
        ((c / self.heads) as f32).powf(-0.5)
    }

    /// `xw` `[N, L, C]` windows -> `[N, L, C]`.
    pub(super) fn forward_t(
        &self,
        be: &B,
        xw: &B::Tensor,
    ) -> Result<(B::Tensor, TinyAttnCache<B::Tensor>)> {
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

    pub(super) fn backward(
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
    pub(super) fn depth_forward_t(
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

    pub(super) fn depth_backward(
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
    pub(super) fn load(
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

    pub(super) fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
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
