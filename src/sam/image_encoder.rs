//! SAM's ViT image encoder with the Med-SA adapters and the SD-Trans depth branch.
//!
//! Shapes: images `[B, 3, H, W]` (H, W multiples of the patch) -> tokens `[B, h, w, D]` ->
//! blocks -> neck -> embeddings `[B, C, h, w]`. The absolute position embedding is resampled
//! bicubically when `(h, w)` differs from its native grid, and each block's relative-position
//! tables are resampled linearly (`sam::rel_pos`), so any multiple-of-patch input works.
//!
//! Block order. Official SAM: `norm1` then window partition (padding is zeros after the norm).
//! Med-SA blocks (any adapter present) partition first and normalise after, as the reference
//! code does, so padded tokens become `norm1(0) = norm1.bias`; we follow each checkpoint's own
//! reference so that results match the code it was trained with.

use crate::backend::{Act, Backend, RelPos};
use crate::error::{Error, Result};
use crate::medsa::adapter::Adapter;
use crate::medsa::depth_branch::{self, DepthMode};
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::sam::config::{BlockConfig, SamConfig};
use crate::sam::rel_pos;
use crate::sam::Trace;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// How a batch of images is to be read as volumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthSpec {
    /// Slices per volume; the batch is `volumes * d` images, slice index fastest.
    pub d: usize,
    /// Treatment of windowed blocks.
    pub mode: DepthMode,
}

/// Gathered rel-pos tables `(rh, rw)` per token grid.
type RelCache<T> = std::sync::Mutex<std::collections::HashMap<(usize, usize), (T, T)>>;

/// Encoder self-attention with decomposed relative-position bias.
pub struct EncoderAttention<B: Backend> {
    /// `dim -> 3*dim`.
    pub qkv: Linear<B>,
    /// `dim -> dim`.
    pub proj: Linear<B>,
    /// Host copies of the `rel_pos_h` / `rel_pos_w` tables `[2S-1, head_dim]`: they are
    /// resampled and gathered per token grid.
    pub rel_pos_h: Tensor,
    /// See `rel_pos_h`.
    pub rel_pos_w: Tensor,
    /// Checkpoint keys of the two tables (`attn.rel_pos_h` or Med-SA's `attn.rel_h`).
    pub rel_keys: (String, String),
    /// Heads.
    pub heads: usize,
    /// Gathered tables per token grid, uploaded once (a device round trip per block and call
    /// would stall the stream).
    pub rel_cache: RelCache<B::Tensor>,
}

impl<B: Backend> EncoderAttention<B> {
    pub(crate) fn rel_tables(
        &self,
        be: &B,
        gh: usize,
        gw: usize,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let mut cache = self.rel_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let rh = be.upload(&rel_pos::gather(&self.rel_pos_h, gh, gh)?)?;
        let rw = be.upload(&rel_pos::gather(&self.rel_pos_w, gw, gw)?)?;
        cache.insert((gh, gw), (rh.clone(), rw.clone()));
        Ok((rh, rw))
    }

    /// Self-attention over `x` `[N, gh, gw, D]` (each of the N maps attends within itself).
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let s = be.dims(x).to_vec();
        let (n, gh, gw, dim) = (s[0], s[1], s[2], s[3]);
        let xs = be.reshape(x, &[n, gh * gw, dim])?;
        let qkv = self.qkv.forward(be, &xs, Act::None)?;
        let (rh, rw) = self.rel_tables(be, gh, gw)?;
        let hd = dim / self.heads;
        let rel = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (gh, gw),
            k_grid: (gh, gw),
        };
        let o = be.attention_qkv(&qkv, self.heads, (hd as f32).powf(-0.5), Some(rel))?;
        let o = self.proj.forward(be, &o, Act::None)?;
        be.reshape(&o, &[n, gh, gw, dim])
    }
}

/// One transformer block (SPEC sections 1-3).
pub struct Block<B: Backend> {
    /// Configuration (window, adapters).
    pub cfg: BlockConfig,
    /// Pre-attention norm.
    pub norm1: LayerNorm<B>,
    /// Attention.
    pub attn: EncoderAttention<B>,
    /// Pre-MLP norm.
    pub norm2: LayerNorm<B>,
    /// MLP first layer (GELU).
    pub lin1: Linear<B>,
    /// MLP second layer.
    pub lin2: Linear<B>,
    /// Med-SA adapter after attention (with skip).
    pub space_adapter: Option<Adapter<B>>,
    /// Med-SA adapter parallel to the MLP (no skip, scale 0.5).
    pub mlp_adapter: Option<Adapter<B>>,
    /// SD-Trans depth adapter (no skip).
    pub depth_adapter: Option<Adapter<B>>,
}

/// Scale of the MLP adapter's contribution (Med-SA's `scale`).
pub const MLP_ADAPTER_SCALE: f32 = 0.5;

impl<B: Backend> Block<B> {
    pub(crate) fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig, i: usize) -> Result<Self> {
        let p = format!("image_encoder.blocks.{i}");
        let bc = cfg.blocks[i].clone();
        let d = cfg.embed_dim;
        let hd = d / cfg.heads;
        let table = |ws: &mut WeightStore, axis: &str| -> Result<Tensor> {
            let a = format!("{p}.attn.rel_pos_{axis}");
            let b = format!("{p}.attn.rel_{axis}");
            let len = ws.shape(&ws.find(&[&a, &b]).unwrap_or(a.clone()))?[0];
            let s = if bc.window == 0 {
                if axis == "h" {
                    cfg.pos_grid.0
                } else {
                    cfg.pos_grid.1
                }
            } else {
                bc.window
            };
            if len != 2 * s - 1 {
                return Err(Error::ShapeMismatch {
                    path: ws.path().to_path_buf(),
                    key: ws.find(&[&a, &b]).unwrap_or(a),
                    expected: vec![2 * s - 1, hd],
                    found: vec![len, hd],
                });
            }
            ws.take_alias(&[&a, &b], &[len, hd])
        };
        let key = |ws: &WeightStore, axis: &str| {
            let a = format!("{p}.attn.rel_pos_{axis}");
            let b = format!("{p}.attn.rel_{axis}");
            ws.find(&[&a, &b]).unwrap_or(a)
        };
        let rel_keys = (key(ws, "h"), key(ws, "w"));
        let rel_pos_h = table(ws, "h")?;
        let rel_pos_w = table(ws, "w")?;
        Ok(Block {
            norm1: LayerNorm::load(be, ws, &format!("{p}.norm1"), d, 1e-6)?,
            attn: EncoderAttention {
                qkv: Linear::load(be, ws, &format!("{p}.attn.qkv"), d, 3 * d, true)?,
                proj: Linear::load(be, ws, &format!("{p}.attn.proj"), d, d, true)?,
                rel_pos_h,
                rel_pos_w,
                rel_keys,
                heads: cfg.heads,
                rel_cache: Default::default(),
            },
            norm2: LayerNorm::load(be, ws, &format!("{p}.norm2"), d, 1e-6)?,
            lin1: Linear::load(be, ws, &format!("{p}.mlp.lin1"), d, cfg.mlp_dim, true)?,
            lin2: Linear::load(be, ws, &format!("{p}.mlp.lin2"), cfg.mlp_dim, d, true)?,
            space_adapter: Adapter::load_opt(be, ws, &format!("{p}.Space_Adapter"), d, true)?,
            mlp_adapter: Adapter::load_opt(be, ws, &format!("{p}.MLP_Adapter"), d, false)?,
            depth_adapter: Adapter::load_opt(be, ws, &format!("{p}.Depth_Adapter"), d, false)?,
            cfg: bc,
        })
    }

    /// The SD-Trans branch on `x` `[b*d, h, w, C]` (see `medsa::depth_branch`).
    fn depth_branch(
        &self,
        be: &B,
        x: &B::Tensor,
        d: usize,
        adapter: &Adapter<B>,
    ) -> Result<B::Tensor> {
        let s = be.dims(x).to_vec();
        let (dh, dw) = depth_branch::depth_grid(d);
        let xd = depth_branch::to_depth_major(be, x, d)?;
        let xd = self.norm1.forward(be, &xd)?;
        let n = be.dims(&xd)[0];
        let xd = be.reshape(&xd, &[n, dh, dw, s[3]])?;
        let xd = self.attn.forward(be, &xd)?;
        let xd = adapter.forward(be, &xd)?;
        depth_branch::from_depth_major(be, &xd, d, (s[1], s[2]))
    }

    /// `x` `[B, h, w, D]` -> `[B, h, w, D]`. Takes the fused path (`sam::encoder_fused`) when
    /// the backend fuses and the block's configuration allows it.
    pub fn forward(&self, be: &B, x: &B::Tensor, depth: Option<DepthSpec>) -> Result<B::Tensor> {
        if be.fused() && self.fusable(depth) {
            self.forward_fused(be, x, depth)
        } else {
            self.forward_plain(be, x, depth)
        }
    }

    /// The block op by op, as SPEC.md writes it: window partition and unpartition, separate
    /// residual adds, the depth branch through explicit depth-major transposes.
    pub fn forward_plain(
        &self,
        be: &B,
        x: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<B::Tensor> {
        let s = be.dims(x).to_vec();
        let (h, w) = (s[1], s[2]);
        let ws = self.cfg.window;
        let depth = match (&self.depth_adapter, depth) {
            (Some(a), Some(spec)) => Some((a, spec)),
            _ => None,
        };
        // Partitioned input of the attention (and of the compat depth branch).
        let (xw, attn_in) = if self.cfg.is_medsa() {
            let xw = if ws > 0 {
                be.window_partition(x, ws)?
            } else {
                x.clone()
            };
            let xn = self.norm1.forward(be, &xw)?;
            (xw, xn)
        } else {
            let xn = self.norm1.forward(be, x)?;
            let xn = if ws > 0 {
                be.window_partition(&xn, ws)?
            } else {
                xn
            };
            (x.clone(), xn)
        };
        let mut a = self.attn.forward(be, &attn_in)?;
        if let Some(sa) = &self.space_adapter {
            a = sa.forward(be, &a)?;
        }
        let mut late_depth = None;
        if let Some((ad, spec)) = depth {
            if spec.mode == DepthMode::Compat || ws == 0 {
                let xd = self.depth_branch(be, &xw, spec.d, ad)?;
                a = be.add_scaled(&a, 1.0, &xd, 1.0)?;
            } else {
                late_depth = Some(self.depth_branch(be, x, spec.d, ad)?);
            }
        }
        if ws > 0 {
            a = be.window_unpartition(&a, ws, (h, w))?;
        }
        let mut x = be.add_scaled(x, 1.0, &a, 1.0)?;
        if let Some(xd) = late_depth {
            x = be.add_scaled(&x, 1.0, &xd, 1.0)?;
        }
        let xn = self.norm2.forward(be, &x)?;
        let m = self.lin1.forward(be, &xn, Act::Gelu)?;
        let m = self.lin2.forward(be, &m, Act::None)?;
        let mut x = be.add_scaled(&x, 1.0, &m, 1.0)?;
        if let Some(ma) = &self.mlp_adapter {
            let y = ma.forward(be, &xn)?;
            x = be.add_scaled(&x, 1.0, &y, MLP_ADAPTER_SCALE)?;
        }
        Ok(x)
    }
}

/// The image encoder.
pub struct ImageEncoder<B: Backend> {
    /// Patch embedding (kernel = stride = patch).
    pub patch_embed: Conv2d<B>,
    /// Host copy of the absolute position embedding `[1, gh, gw, D]`.
    pub pos_embed_host: Tensor,
    /// The same on the device, at its native grid.
    pub pos_embed: B::Tensor,
    /// Blocks.
    pub blocks: Vec<Block<B>>,
    /// Neck 1x1 conv as a linear layer `[C, D]`, no bias.
    pub neck_conv1: Linear<B>,
    /// Neck LayerNorm2d.
    pub neck_norm1: LayerNorm<B>,
    /// Neck 3x3 conv, no bias.
    pub neck_conv2: Conv2d<B>,
    /// Neck LayerNorm2d.
    pub neck_norm2: LayerNorm<B>,
    /// Patch size.
    pub patch: usize,
}

impl<B: Backend> ImageEncoder<B> {
    /// Loads `image_encoder.*`.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch;
        let pos_embed_host = ws.take(
            "image_encoder.pos_embed",
            &[1, cfg.pos_grid.0, cfg.pos_grid.1, d],
        )?;
        let neck_w = ws.take("image_encoder.neck.0.weight", &[cfg.out_chans, d, 1, 1])?;
        Ok(ImageEncoder {
            patch_embed: Conv2d::load(
                be,
                ws,
                "image_encoder.patch_embed.proj",
                3,
                d,
                p,
                p,
                0,
                true,
            )?,
            pos_embed: be.upload(&pos_embed_host)?,
            pos_embed_host,
            blocks: (0..cfg.depth())
                .map(|i| Block::load(be, ws, cfg, i))
                .collect::<Result<_>>()?,
            neck_conv1: Linear {
                weight: be.upload(&neck_w.reshape(&[cfg.out_chans, d])?)?,
                bias: None,
                name: "image_encoder.neck.0".into(),
            },
            neck_norm1: LayerNorm::load(be, ws, "image_encoder.neck.1", cfg.out_chans, 1e-6)?,
            neck_conv2: Conv2d::load(
                be,
                ws,
                "image_encoder.neck.2",
                cfg.out_chans,
                cfg.out_chans,
                3,
                1,
                1,
                false,
            )?,
            neck_norm2: LayerNorm::load(be, ws, "image_encoder.neck.3", cfg.out_chans, 1e-6)?,
            patch: p,
        })
    }

    /// The position embedding for a `(gh, gw)` token grid, `[1, gh, gw, D]`.
    pub fn pos_embed_for(&self, be: &B, grid: (usize, usize)) -> Result<B::Tensor> {
        let s = self.pos_embed_host.shape();
        if (s[1], s[2]) == grid {
            return Ok(self.pos_embed.clone());
        }
        let nchw = be.permute(&self.pos_embed, &[0, 3, 1, 2])?;
        let r = be.resize_bicubic(&nchw, grid)?;
        be.permute(&r, &[0, 2, 3, 1])
    }

    /// `images` `[B, 3, H, W]` -> embeddings `[B, C, H/p, W/p]`.
    pub fn forward(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        trace: &mut Trace<B>,
    ) -> Result<B::Tensor> {
        let s = be.dims(images).to_vec();
        if s.len() != 4
            || s[1] != 3
            || s[2] % self.patch != 0
            || s[3] % self.patch != 0
            || s[2] == 0
        {
            return Err(Error::Input(format!(
                "images have shape {s:?}; expected [B, 3, H, W] with H and W positive multiples of {}",
                self.patch
            )));
        }
        if let Some(spec) = depth {
            if spec.d == 0 || s[0] % spec.d != 0 {
                return Err(Error::Input(format!(
                    "a batch of {} images is not a whole number of {}-slice volumes",
                    s[0], spec.d
                )));
            }
        }
        let grid = (s[2] / self.patch, s[3] / self.patch);
        let x = be.permute(images, &[0, 2, 3, 1])?;
        let x = self.patch_embed.forward(be, &x)?;
        let pos = self.pos_embed_for(be, grid)?;
        let mut x = be.add_scaled(&x, 1.0, &pos, 1.0)?;
        trace.record(be, "enc.patch_embed", &x);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(be, &x, depth)?;
            trace.record_with(be, || format!("enc.blocks.{i}"), &x);
        }
        let y = self.neck_conv1.forward(be, &x, Act::None)?;
        let y = self.neck_norm1.forward(be, &y)?;
        let y = self.neck_conv2.forward(be, &y)?;
        let y = self.neck_norm2.forward(be, &y)?;
        be.permute(&y, &[0, 3, 1, 2])
    }
}

// ----- training: forward with caches, backward --------------------------------------------------

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
        let rel = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (gh, gw),
            k_grid: (gh, gw),
        };
        let o = be.attention_qkv(&qkv, self.heads, self.scale(dim), Some(rel))?;
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

    /// [`Block::forward`] keeping what backward needs.
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

/// What [`ImageEncoder::forward_t`] keeps.
pub struct EncoderCache<T> {
    x0: Option<T>,
    blocks: Vec<SavedBlock<T>>,
    depth: Option<DepthSpec>,
    x_last: T,
    y1: T,
    y1n: T,
    y2: T,
    grid: (usize, usize),
}

impl<B: Backend> ImageEncoder<B> {
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
    ) -> Result<(B::Tensor, EncoderCache<B::Tensor>)> {
        let s = be.dims(images).to_vec();
        if s.len() != 4 || s[1] != 3 || s[2] % self.patch != 0 || s[3] % self.patch != 0 {
            return Err(Error::Input(format!(
                "images have shape {s:?}; expected [B, 3, H, W] with H and W multiples of {}",
                self.patch
            )));
        }
        let grid = (s[2] / self.patch, s[3] / self.patch);
        let first = self.first_trained_block(grads);
        let x0 = be.permute(images, &[0, 2, 3, 1])?;
        let x = self.patch_embed.forward(be, &x0)?;
        let pos = self.pos_embed_for(be, grid)?;
        let mut x = be.add_scaled(&x, 1.0, &pos, 1.0)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            if i < first {
                x = blk.forward(be, &x, depth)?;
                blocks.push(SavedBlock::Skipped);
            } else if recompute {
                let y = blk.forward(be, &x, depth)?;
                blocks.push(SavedBlock::Input(x));
                x = y;
            } else {
                let (y, c) = blk.forward_t(be, &x, depth)?;
                blocks.push(SavedBlock::Full(Box::new(c)));
                x = y;
            }
        }
        let y1 = self.neck_conv1.forward(be, &x, Act::None)?;
        let y1n = self.neck_norm1.forward(be, &y1)?;
        let y2 = self.neck_conv2.forward(be, &y1n)?;
        let y = self.neck_norm2.forward(be, &y2)?;
        let out = be.permute(&y, &[0, 3, 1, 2])?;
        let x0 = if first == 0 { Some(x0) } else { None };
        Ok((
            out,
            EncoderCache {
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
        c: &EncoderCache<B::Tensor>,
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
