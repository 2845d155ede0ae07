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

use crate::backend::{Act, Backend, RelPos, Tokens};
use crate::error::{Error, Result};
use crate::medsa::adapter::Adapter;
use crate::medsa::depth_branch::DepthMode;
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::nn::{Grads, ParamList};
use crate::sam::config::{BlockConfig, SamConfig};
use crate::sam::rel_pos;
use crate::sam::tiny_vit::{TinyVit, TinyVitCache};
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
        let rel = RelPos::shift_invariant(&rh, &rw, (gh, gw));
        let o = be.attention_qkv(
            &qkv,
            Tokens::Sequences,
            self.heads,
            (hd as f32).powf(-0.5),
            Some(rel),
        )?;
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

    /// `x` `[B, h, w, D]` -> `[B, h, w, D]`. Inference is the training forward
    /// ([`Block::forward_t`]) with its cache dropped, so inference, training and recomputation run
    /// one body; backends that fuse take the fused variant (`sam::encoder_fused`, the same math
    /// in fewer passes) where the block's configuration allows it.
    pub fn forward(&self, be: &B, x: &B::Tensor, depth: Option<DepthSpec>) -> Result<B::Tensor> {
        if be.fused() && self.fusable(depth) {
            self.forward_fused(be, x, depth)
        } else {
            Ok(self.forward_t(be, x, depth)?.0)
        }
    }
}

/// SAM's ViT image encoder.
pub struct VitEncoder<B: Backend> {
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

impl<B: Backend> VitEncoder<B> {
    /// Loads `image_encoder.*`.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch;
        let pg = cfg.pos_embed_grid();
        let pos_embed_host = ws.take("image_encoder.pos_embed", &[1, pg.0, pg.1, d])?;
        let neck_w = ws.take("image_encoder.neck.0.weight", &[cfg.out_chans, d, 1, 1])?;
        Ok(VitEncoder {
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

    /// `images` `[B, 3, H, W]` -> embeddings `[B, C, H/p, W/p]`: the training forward with
    /// no block trained (so nothing is kept), recording each stage in `trace`.
    pub fn forward(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        trace: &mut Trace<B>,
    ) -> Result<B::Tensor> {
        Ok(self
            .run(be, images, depth, self.blocks.len(), false, trace)?
            .0)
    }

    /// The token grid of `images`, or an error naming what is wrong with the batch.
    pub(crate) fn check_input(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<(usize, usize)> {
        let s = be.dims(images).to_vec();
        if s.len() != 4
            || s[1] != 3
            || s[2] % self.patch != 0
            || s[3] % self.patch != 0
            || s[2] == 0
            || s[3] == 0
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
        Ok((s[2] / self.patch, s[3] / self.patch))
    }
}

pub use super::encoder_train::{AttnCache, BlockCache, DepthCache, VitCache};

/// The image encoder `Sam` holds (one per model, so the variants' sizes do not matter): SAM's ViT or a TinyViT (SPEC section 8). Both take
/// preprocessed images `[B, 3, H, W]` and return embeddings `[B, C, h, w]`.
#[allow(clippy::large_enum_variant)]
pub enum ImageEncoder<B: Backend> {
    /// SAM's ViT-B/L/H (and Med-SA's adapters on it).
    Vit(VitEncoder<B>),
    /// TinyViT (MobileSAM, LiteMedSAM) with Med-SA's adapters.
    TinyVit(TinyVit<B>),
}

/// What [`ImageEncoder::forward_t`] keeps.
pub enum EncoderCache<T> {
    /// ViT.
    Vit(VitCache<T>),
    /// TinyViT.
    TinyVit(TinyVitCache<T>),
}

impl<B: Backend> ImageEncoder<B> {
    /// Loads `image_encoder.*` for the encoder `cfg` describes.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        Ok(match cfg.tiny_vit {
            Some(_) => ImageEncoder::TinyVit(TinyVit::load(be, ws, cfg)?),
            None => ImageEncoder::Vit(VitEncoder::load(be, ws, cfg)?),
        })
    }

    /// `images` `[B, 3, H, W]` -> embeddings `[B, C, h, w]`, recording stages in `trace`.
    pub fn forward(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        trace: &mut Trace<B>,
    ) -> Result<B::Tensor> {
        match self {
            ImageEncoder::Vit(e) => e.forward(be, images, depth, trace),
            ImageEncoder::TinyVit(e) => Ok(e.run(be, images, depth, None, trace)?.0),
        }
    }

    /// The forward keeping what backward needs for the parameters `grads` trains.
    pub fn forward_t(
        &self,
        be: &B,
        images: &B::Tensor,
        depth: Option<DepthSpec>,
        grads: &Grads<B>,
        recompute: bool,
    ) -> Result<(B::Tensor, EncoderCache<B::Tensor>)> {
        match self {
            ImageEncoder::Vit(e) => {
                let (y, c) = e.forward_t(be, images, depth, grads, recompute)?;
                Ok((y, EncoderCache::Vit(c)))
            }
            ImageEncoder::TinyVit(e) => {
                let (y, c) = e.run(be, images, depth, Some(grads), &mut Trace::off())?;
                Ok((y, EncoderCache::TinyVit(c)))
            }
        }
    }

    /// Accumulates the encoder's parameter gradients given `d(embeddings)`.
    pub fn backward(
        &self,
        be: &B,
        c: &EncoderCache<B::Tensor>,
        demb: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<()> {
        match (self, c) {
            (ImageEncoder::Vit(e), EncoderCache::Vit(c)) => e.backward(be, c, demb, grads),
            (ImageEncoder::TinyVit(e), EncoderCache::TinyVit(c)) => e.backward(be, c, demb, grads),
            _ => Err(Error::shape(
                "ImageEncoder::backward",
                String::from("cache from the other encoder kind"),
            )),
        }
    }

    /// Appends the parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        match self {
            ImageEncoder::Vit(e) => e.params(out),
            ImageEncoder::TinyVit(e) => e.params(out),
        }
    }

    /// Re-derives device copies of host parameters after an update.
    pub fn refresh_caches(&mut self, be: &B) -> Result<()> {
        match self {
            ImageEncoder::Vit(e) => e.refresh_caches(be),
            ImageEncoder::TinyVit(e) => e.refresh_caches(be),
        }
    }

    /// Whether any encoder parameter is trained.
    pub fn any_trained(&self, grads: &Grads<B>) -> bool {
        match self {
            ImageEncoder::Vit(e) => e.any_trained(grads),
            ImageEncoder::TinyVit(e) => e.any_trained(grads),
        }
    }

    /// The ViT encoder, if this is one.
    pub fn vit(&self) -> Option<&VitEncoder<B>> {
        match self {
            ImageEncoder::Vit(e) => Some(e),
            ImageEncoder::TinyVit(_) => None,
        }
    }
}
