//! Training side of the image encoder: forward passes that keep what the backward passes need
//! (`forward_t`), and the backward passes (explicit, layer by layer; `nn` states the gradient
//! rules). The inference side is `sam::image_encoder`.

use crate::backend::{Act, Backend, RelPos, Tokens};
use crate::error::{Error, Result};
use crate::medsa::adapter::Adapter;
use crate::medsa::depth_branch::{self, DepthMode};
use crate::sam::image_encoder::{
    Block, DepthSpec, EncoderAttention, VitEncoder, MLP_ADAPTER_SCALE,
};
use crate::sam::rel_pos;
use crate::sam::Trace;

use crate::medsa::adapter::AdapterCache;
use crate::nn::{dx, Grads, Param, ParamList};

/// What [`EncoderAttention::forward_t`] keeps.
pub struct AttnCache<T> {
    xs: T,
    qkv: T,
    o: T,
    rh: T,
    rw: T,
    grid: (usize, usize),
}

impl<B: Backend> EncoderAttention<B> {
    fn scale(&self, dim: usize) -> f32 {
        ((dim / self.heads) as f32).powf(-0.5)
    }

    /// Drops the gathered tables (after the host tables changed).
    pub fn clear_cache(&self) {
        self.rel_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Parameter names.
    pub fn param_names(&self) -> Vec<String> {
        let mut v = self.qkv.param_names();
        v.extend(self.proj.param_names());
        v.push(self.rel_keys.0.clone());
        v.push(self.rel_keys.1.clone());
        v
    }

    /// Appends the parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.qkv.params(out);
        self.proj.params(out);
        out.push((self.rel_keys.0.clone(), Param::Host(&mut self.rel_pos_h)));
        out.push((self.rel_keys.1.clone(), Param::Host(&mut self.rel_pos_w)));
    }

    /// Forward keeping what backward needs.
    pub fn forward_t(&self, be: &B, x: &B::Tensor) -> Result<(B::Tensor, AttnCache<B::Tensor>)> {
        let s = be.dims(x).to_vec();
        let (n, gh, gw, dim) = (s[0], s[1], s[2], s[3]);
        let xs = be.reshape(x, &[n, gh * gw, dim])?;
        let qkv = self.qkv.forward(be, &xs, Act::None)?;
        let (rh, rw) = self.rel_tables(be, gh, gw)?;
        let rel = RelPos::shift_invariant(&rh, &rw, (gh, gw));
        let o = be.attention_qkv(
            &qkv,
            Tokens::Sequences,
            self.heads,
            self.scale(dim),
            Some(rel),
        )?;
        let y = self.proj.forward(be, &o, Act::None)?;
        let y = be.reshape(&y, &[n, gh, gw, dim])?;
        Ok((
            y,
            AttnCache {
                xs,
                qkv,
                o,
                rh,
                rw,
                grid: (gh, gw),
            },
        ))
    }

    /// `dx` `[N, gh, gw, D]` given the output gradient.
    pub fn backward(
        &self,
        be: &B,
        c: &AttnCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let s = be.dims(dy).to_vec();
        let (n, gh, gw, dim) = (s[0], s[1], s[2], s[3]);
        let dy = be.reshape(dy, &[n, gh * gw, dim])?;
        let d_o = dx(self.proj.backward_pre(be, &c.o, &dy, grads, true)?)?;
        let q = be.narrow(&c.qkv, 2, 0, dim)?;
        let k = be.narrow(&c.qkv, 2, dim, dim)?;
        let v = be.narrow(&c.qkv, 2, 2 * dim, dim)?;
        let rel = RelPos {
            rh: &c.rh,
            rw: &c.rw,
            q_grid: c.grid,
            k_grid: c.grid,
            shift_invariant: true,
        };
        let g = be.attention_backward(
            &q,
            &k,
            &v,
            &c.o,
            &d_o,
            self.heads,
            self.scale(dim),
            Some(rel),
        )?;
        if let Some((drh, drw)) = g.drel {
            for (key, table, dg, side) in [
                (&self.rel_keys.0, &self.rel_pos_h, drh, gh),
                (&self.rel_keys.1, &self.rel_pos_w, drw, gw),
            ] {
                if grads.wants(key) {
                    let host = be.download(&dg)?;
                    let dt = rel_pos::gather_backward(&host, table.dim(0), side, side)?;
                    grads.accum(be, key, be.upload(&dt)?)?;
                }
            }
        }
        let dqkv = be.concat(&[&g.dq, &g.dk, &g.dv], 2)?;
        let dxs = dx(self.qkv.backward_pre(be, &c.xs, &dqkv, grads, true)?)?;
        be.reshape(&dxs, &[n, gh, gw, dim])
    }
}

/// What the depth branch keeps.
pub struct DepthCache<T> {
    xd: T,
    attn: AttnCache<T>,
    adapter: AdapterCache<T>,
    d: usize,
    hw: (usize, usize),
}

/// What [`Block::forward_t`] keeps (or only the input, with recomputation).
pub struct BlockCache<T> {
    x: T,
    /// Input of `norm1` (the partitioned block input for Med-SA blocks, else the block input).
    ln1_in: T,
    attn: AttnCache<T>,
    space: Option<AdapterCache<T>>,
    /// Depth branch on the partitioned input (compat mode / global blocks).
    depth_early: Option<DepthCache<T>>,
    /// Depth branch on the block input (per-token mode in windowed blocks).
    depth_late: Option<DepthCache<T>>,
    x1: T,
    xn2: T,
    h: T,
    pre: Option<T>,
    mlp_adapter: Option<AdapterCache<T>>,
}

impl<B: Backend> Block<B> {
    /// Every parameter name of the block.
    pub fn param_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for ln in [&self.norm1, &self.norm2] {
            v.push(format!("{}.weight", ln.name));
            v.push(format!("{}.bias", ln.name));
        }
        v.extend(self.attn.param_names());
        v.extend(self.lin1.param_names());
        v.extend(self.lin2.param_names());
        for a in [&self.space_adapter, &self.mlp_adapter, &self.depth_adapter]
            .into_iter()
            .flatten()
        {
            v.extend(a.fc1.param_names());
            v.extend(a.fc2.param_names());
        }
        v
    }

    /// Appends the parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.norm1.params(out);
        self.attn.params(out);
        self.norm2.params(out);
        self.lin1.params(out);
        self.lin2.params(out);
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

    fn depth_branch_t(
        &self,
        be: &B,
        x: &B::Tensor,
        d: usize,
        adapter: &Adapter<B>,
    ) -> Result<(B::Tensor, DepthCache<B::Tensor>)> {
        let s = be.dims(x).to_vec();
        let (dh, dw) = depth_branch::depth_grid(d);
        let xd = depth_branch::to_depth_major(be, x, d)?;
        let xn = self.norm1.forward(be, &xd)?;
        let n = be.dims(&xn)[0];
        let xn = be.reshape(&xn, &[n, dh, dw, s[3]])?;
        let (a, attn) = self.attn.forward_t(be, &xn)?;
        let (y, adapter) = adapter.forward_t(be, &a)?;
        let out = depth_branch::from_depth_major(be, &y, d, (s[1], s[2]))?;
        Ok((
            out,
            DepthCache {
                xd,
                attn,
                adapter,
                d,
                hw: (s[1], s[2]),
            },
        ))
    }

    fn depth_branch_backward(
        &self,
        be: &B,
        c: &DepthCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let adapter = self.depth_adapter.as_ref().ok_or_else(|| {
            Error::shape("depth_branch_backward", String::from("no depth adapter"))
        })?;
        let (dh, dw) = depth_branch::depth_grid(c.d);
        // from_depth_major is a permutation; its adjoint is to_depth_major.
        let g = depth_branch::to_depth_major(be, dy, c.d)?;
        let s = be.dims(&g).to_vec();
        let g = be.reshape(&g, &[s[0], dh, dw, s[2]])?;
        let g = adapter.backward(be, &c.adapter, &g, grads)?;
        let g = self.attn.backward(be, &c.attn, &g, grads)?;
        let g = be.reshape(&g, &[s[0], s[1], s[2]])?;
        let g = self.norm1.backward(be, &c.xd, &g, grads)?;
        depth_branch::from_depth_major(be, &g, c.d, c.hw)
    }

    /// The block as SPEC.md writes it (window partition and unpartition, separate residual
    /// adds, the depth branch through explicit depth-major transposes), keeping what backward
    /// needs; [`Block::forward`] is this with the cache dropped.
    pub fn forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<(B::Tensor, BlockCache<B::Tensor>)> {
        let s = be.dims(x).to_vec();
        let (h, w) = (s[1], s[2]);
        let ws = self.cfg.window;
        let depth = match (&self.depth_adapter, depth) {
            (Some(a), Some(spec)) => Some((a, spec)),
            _ => None,
        };
        let (xw, ln1_in, attn_in) = if self.cfg.is_medsa() {
            let xw = if ws > 0 {
                be.window_partition(x, ws)?
            } else {
                x.clone()
            };
            let xn = self.norm1.forward(be, &xw)?;
            (xw.clone(), xw, xn)
        } else {
            let xn = self.norm1.forward(be, x)?;
            let xn = if ws > 0 {
                be.window_partition(&xn, ws)?
            } else {
                xn
            };
            (x.clone(), x.clone(), xn)
        };
        let (mut a, attn) = self.attn.forward_t(be, &attn_in)?;
        let mut space = None;
        if let Some(sa) = &self.space_adapter {
            let (y, c) = sa.forward_t(be, &a)?;
            a = y;
            space = Some(c);
        }
        let (mut depth_early, mut depth_late, mut late) = (None, None, None);
        if let Some((ad, spec)) = depth {
            if spec.mode == DepthMode::Compat || ws == 0 {
                let (xd, c) = self.depth_branch_t(be, &xw, spec.d, ad)?;
                a = be.add_scaled(&a, 1.0, &xd, 1.0)?;
                depth_early = Some(c);
            } else {
                let (xd, c) = self.depth_branch_t(be, x, spec.d, ad)?;
                late = Some(xd);
                depth_late = Some(c);
            }
        }
        if ws > 0 {
            a = be.window_unpartition(&a, ws, (h, w))?;
        }
        let mut x1 = be.add_scaled(x, 1.0, &a, 1.0)?;
        if let Some(xd) = late {
            x1 = be.add_scaled(&x1, 1.0, &xd, 1.0)?;
        }
        let xn2 = self.norm2.forward(be, &x1)?;
        let (hm, pre) = self.lin1.forward_t(be, &xn2, Act::Gelu)?;
        let m = self.lin2.forward(be, &hm, Act::None)?;
        let mut y = be.add_scaled(&x1, 1.0, &m, 1.0)?;
        let mut mlp_adapter = None;
        if let Some(ma) = &self.mlp_adapter {
            let (ya, c) = ma.forward_t(be, &xn2)?;
            y = be.add_scaled(&y, 1.0, &ya, MLP_ADAPTER_SCALE)?;
            mlp_adapter = Some(c);
        }
        Ok((
            y,
            BlockCache {
                x: x.clone(),
                ln1_in,
                attn,
                space,
                depth_early,
                depth_late,
                x1,
                xn2,
                h: hm,
                pre,
                mlp_adapter,
            },
        ))
    }

    /// `dx` given the block's output gradient.
    pub fn backward(
        &self,
        be: &B,
        c: &BlockCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let s = be.dims(&c.x).to_vec();
        let (h, w) = (s[1], s[2]);
        let ws = self.cfg.window;
        // MLP half: y = x1 + lin2(gelu(lin1(xn2))) + 0.5 * adapter(xn2), xn2 = norm2(x1).
        let dhm = dx(self.lin2.backward_pre(be, &c.h, dy, grads, true)?)?;
        let mut dxn2 = dx(self.lin1.backward(
            be,
            &c.xn2,
            &c.h,
            c.pre.as_ref(),
            Act::Gelu,
            &dhm,
            grads,
            true,
        )?)?;
        if let (Some(ma), Some(mc)) = (&self.mlp_adapter, &c.mlp_adapter) {
            let g = be.add_scaled(dy, MLP_ADAPTER_SCALE, dy, 0.0)?;
            let da = ma.backward(be, mc, &g, grads)?;
            dxn2 = be.add_scaled(&dxn2, 1.0, &da, 1.0)?;
        }
        let dn2 = self.norm2.backward(be, &c.x1, &dxn2, grads)?;
        let dx1 = be.add_scaled(dy, 1.0, &dn2, 1.0)?;
        // Attention half: x1 = x + unpartition(a) (+ late depth branch on x).
        let mut dxin = dx1.clone();
        if let Some(dc) = &c.depth_late {
            let g = self.depth_branch_backward(be, dc, &dx1, grads)?;
            dxin = be.add_scaled(&dxin, 1.0, &g, 1.0)?;
        }
        // unpartition drops the padding; its adjoint partitions with zero padding.
        let da = if ws > 0 {
            be.window_partition(&dx1, ws)?
        } else {
            dx1
        };
        let mut dxw_extra = None;
        if let Some(dc) = &c.depth_early {
            dxw_extra = Some(self.depth_branch_backward(be, dc, &da, grads)?);
        }
        let da = match (&self.space_adapter, &c.space) {
            (Some(sa), Some(sc)) => sa.backward(be, sc, &da, grads)?,
            _ => da,
        };
        let dattn_in = self.attn.backward(be, &c.attn, &da, grads)?;
        let dpart = if self.cfg.is_medsa() {
            // attn_in = norm1(partition(x)).
            let mut g = self.norm1.backward(be, &c.ln1_in, &dattn_in, grads)?;
            if let Some(e) = dxw_extra {
                g = be.add_scaled(&g, 1.0, &e, 1.0)?;
            }
            if ws > 0 {
                be.window_unpartition(&g, ws, (h, w))?
            } else {
                g
            }
        } else {
            // attn_in = partition(norm1(x)); the early depth branch read x itself.
            let g = if ws > 0 {
                be.window_unpartition(&dattn_in, ws, (h, w))?
            } else {
                dattn_in
            };
            let mut g = self.norm1.backward(be, &c.ln1_in, &g, grads)?;
            if let Some(e) = dxw_extra {
                g = be.add_scaled(&g, 1.0, &e, 1.0)?;
            }
            g
        };
        be.add_scaled(&dxin, 1.0, &dpart, 1.0)
    }
}

/// A block's saved state: everything, or only its input (recomputed in backward).
pub enum SavedBlock<T> {
    /// The full cache.
    Full(Box<BlockCache<T>>),
    /// Only the input; the forward runs again during backward (activation recomputation).
    Input(T),
    /// Not needed: no gradient flows this far back.
    Skipped,
}

/// What [`VitEncoder::forward_t`] keeps.
pub struct VitCache<T> {
    x0: Option<T>,
    blocks: Vec<SavedBlock<T>>,
    depth: Option<DepthSpec>,
    x_last: T,
    y1: T,
    y1n: T,
    y2: T,
    grid: (usize, usize),
}

impl<B: Backend> VitEncoder<B> {
    /// Appends the parameters (the position embedding as its host copy).
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.patch_embed.params(out);
        out.push((
            "image_encoder.pos_embed".to_string(),
            Param::Host(&mut self.pos_embed_host),
        ));
        for b in &mut self.blocks {
            b.params(out);
        }
        self.neck_conv1.params(out);
        self.neck_norm1.params(out);
        self.neck_conv2.params(out);
        self.neck_norm2.params(out);
    }

    /// Re-derives the device copies of host parameters after an update.
    pub fn refresh_caches(&mut self, be: &B) -> Result<()> {
        self.pos_embed = be.upload(&self.pos_embed_host)?;
        for b in &self.blocks {
            b.attn.clear_cache();
        }
        Ok(())
    }

    /// Index of the first block that gradients must reach (`blocks.len()` when none).
    fn first_trained_block(&self, grads: &Grads<B>) -> usize {
        let stem = ["image_encoder.pos_embed"]
            .into_iter()
            .map(String::from)
            .chain(self.patch_embed_names());
        if stem.into_iter().any(|n| grads.wants(&n)) {
            return 0;
        }
        self.blocks
            .iter()
            .position(|b| b.param_names().iter().any(|n| grads.wants(n)))
            .unwrap_or(self.blocks.len())
    }

    fn patch_embed_names(&self) -> Vec<String> {
        let mut v = vec![format!("{}.weight", self.patch_embed.name)];
        if self.patch_embed.bias.is_some() {
            v.push(format!("{}.bias", self.patch_embed.name));
        }
        v
    }

    /// Whether any encoder parameter is trained (else the encoder runs without caches).
    pub fn any_trained(&self, grads: &Grads<B>) -> bool {
        let neck = [
            &self.neck_conv1.name,
            &self.neck_norm1.name,
            &self.neck_conv2.name,
            &self.neck_norm2.name,
        ];
        self.first_trained_block(grads) < self.blocks.len()
            || neck
                .iter()
                .any(|n| grads.wants(&format!("{n}.weight")) || grads.wants(&format!("{n}.bias")))
    }

    /// [`ImageEncoder::forward`] keeping what backward needs for the parameters `grads`
    /// trains; with `recompute`, blocks keep only their input and run again in backward.
    pub fn forward_t(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        grads: &Grads<B>,
        recompute: bool,
    ) -> Result<(B::Tensor, VitCache<B::Tensor>)> {
        let first = self.first_trained_block(grads);
        self.run(be, images, depth, first, recompute, &mut Trace::off())
    }

    /// The encoder's one forward. Blocks before `first` take no gradient: they run the
    /// inference forward (fused where the backend fuses) and keep nothing. From `first` on,
    /// a block keeps its cache, or with `recompute` only its input; both run
    /// [`Block::forward_t`], which is also what backward recomputes, so a recomputed block
    /// repeats its forward bit for bit.
    pub(crate) fn run(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        first: usize,
        recompute: bool,
        trace: &mut Trace<B>,
    ) -> Result<(B::Tensor, VitCache<B::Tensor>)> {
        let grid = self.check_input(be, images, depth)?;
        let x0 = be.permute(images, &[0, 2, 3, 1])?;
        let x = self.patch_embed.forward(be, &x0)?;
        let pos = self.pos_embed_for(be, grid)?;
        let mut x = be.add_scaled(&x, 1.0, &pos, 1.0)?;
        trace.record(be, "enc.patch_embed", &x);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            let (y, saved) = if i < first {
                (blk.forward(be, &x, depth)?, SavedBlock::Skipped)
            } else {
                let (y, c) = blk.forward_t(be, &x, depth)?;
                if recompute {
                    (y, SavedBlock::Input(x))
                } else {
                    (y, SavedBlock::Full(Box::new(c)))
                }
            };
            blocks.push(saved);
            x = y;
            trace.record_with(be, || format!("enc.blocks.{i}"), &x);
        }
        let y1 = self.neck_conv1.forward(be, &x, Act::None)?;
        let y1n = self.neck_norm1.forward(be, &y1)?;
        let y2 = self.neck_conv2.forward(be, &y1n)?;
        let y = self.neck_norm2.forward(be, &y2)?;
        let out = be.permute(&y, &[0, 3, 1, 2])?;
        let x0 = if first == 0 { Some(x0) } else { None };
        Ok((
            out,
            VitCache {
                x0,
                blocks,
                depth,
                x_last: x,
                y1,
                y1n,
                y2,
                grid,
            },
        ))
    }

    /// Accumulates the encoder's parameter gradients given `d(embeddings)` `[B, C, h, w]`.
    pub fn backward(
        &self,
        be: &B,
        c: &VitCache<B::Tensor>,
        demb: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<()> {
        let dy = be.permute(demb, &[0, 2, 3, 1])?;
        let g = self.neck_norm2.backward(be, &c.y2, &dy, grads)?;
        let g = dx(self.neck_conv2.backward(be, &c.y1n, &g, grads, true)?)?;
        let g = self.neck_norm1.backward(be, &c.y1, &g, grads)?;
        let skipped = c.blocks.iter().all(|b| matches!(b, SavedBlock::Skipped));
        let Some(mut g) = self
            .neck_conv1
            .backward_pre(be, &c.x_last, &g, grads, !skipped)?
        else {
            return Ok(());
        };
        for (blk, saved) in self.blocks.iter().zip(&c.blocks).rev() {
            g = match saved {
                SavedBlock::Full(bc) => blk.backward(be, bc, &g, grads)?,
                SavedBlock::Input(x) => {
                    let (_, bc) = blk.forward_t(be, x, c.depth)?;
                    blk.backward(be, &bc, &g, grads)?
                }
                SavedBlock::Skipped => return Ok(()),
            };
        }
        // g is now d(patch_embed + pos_embed).
        if grads.wants("image_encoder.pos_embed") {
            let s = self.pos_embed_host.shape();
            if (s[1], s[2]) != c.grid {
                return Err(Error::Input(format!(
                    "training image_encoder.pos_embed needs the model's native input size \
                     (token grid {}x{}, got {}x{}); freeze it or train at that size",
                    s[1], s[2], c.grid.0, c.grid.1
                )));
            }
            let n: usize = s.iter().product();
            let dp = be.sum_rows(&g, n)?;
            grads.accum(be, "image_encoder.pos_embed", be.reshape(&dp, s)?)?;
        }
        if let Some(x0) = &c.x0 {
            self.patch_embed.backward(be, x0, &g, grads, false)?;
        }
        Ok(())
    }
}
