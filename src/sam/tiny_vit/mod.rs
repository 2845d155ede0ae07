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
//!
//! Files: `layers.rs` (the convolutional parts: `Conv2d_BN`, MBConv, PatchMerging), `block.rs`
//! (the attention with its bias table, the depth attention, the TinyViT block with its
//! adapters), this file (stages, the neck, loading, and the encoder's forward and backward).

use crate::backend::{Act, Backend};
use crate::error::{Error, Result};
use crate::nn::{dx, Grads, LayerNorm, Linear, ParamList};
use crate::sam::config::{SamConfig, TinyVitConfig};
use crate::sam::image_encoder::DepthSpec;
use crate::sam::Trace;
use crate::weights::WeightStore;

mod block;
mod layers;

pub use block::{DepthAttnCache, TinyAttention, TinyAttnCache, TinyBlock, TinyBlockCache};
pub use layers::{ConvBn, MbConv, MergeCache, PatchMerging};

/// BatchNorm's epsilon in `Conv2d_BN`.
const BN_EPS: f32 = 1e-5;
/// `nn.LayerNorm`'s default epsilon (the attention's and the MLP's norms).
const LN_EPS: f32 = 1e-5;
/// LayerNorm2d's epsilon in the neck.
const NECK_EPS: f32 = 1e-6;

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
