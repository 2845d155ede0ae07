//! The TinyViT encoder's configuration (MobileSAM, LiteMedSAM; SPEC section 8), inferred from
//! the checkpoint's shapes like the ViT's (see the parent module).

use super::{cfg_err, count_indexed, PatchEmbedKind};
use crate::error::Result;
use crate::weights::WeightStore;

/// The key whose presence marks a TinyViT image encoder.
pub const TINY_VIT_KEY: &str = "image_encoder.patch_embed.seq.0.c.weight";

/// Adapters of one TinyViT block (Med-SA's `TinyViTAdapterBlock`, SPEC section 8).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TinyBlockConfig {
    /// `Space_Adapter` present.
    pub space_adapter: bool,
    /// `MLP_Adapter` present.
    pub mlp_adapter: bool,
    /// `Depth_Adapter` present.
    pub depth_adapter: bool,
}

/// One TinyViT stage: MBConv blocks (stage 0) or TinyViT attention blocks, then (all but the
/// last) a PatchMerging into the next stage's width.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyStageConfig {
    /// Channels.
    pub width: usize,
    /// Attention heads (0 for the convolutional stage).
    pub heads: usize,
    /// Attention window side (0 for the convolutional stage).
    pub window: usize,
    /// MLP hidden width (attention stages) or MBConv expanded width (the convolutional stage).
    pub hidden: usize,
    /// `local_conv` kernel (attention stages; 0 otherwise).
    pub local_conv: usize,
    /// Per-block adapters (all default for the convolutional stage).
    pub blocks: Vec<TinyBlockConfig>,
    /// Stride of the PatchMerging that ends the stage (`None` for the last stage): 1 when the
    /// next width is 320, 448 or 576, else 2 (the reference code's rule; the weights' shapes
    /// cannot show a stride).
    pub merge_stride: Option<usize>,
}

impl TinyStageConfig {
    /// Whether the stage is MBConv (convolutional) rather than attention.
    pub fn is_conv(&self) -> bool {
        self.heads == 0
    }
}

/// A TinyViT image encoder (MobileSAM, LiteMedSAM), inferred from its shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyVitConfig {
    /// The stem's flavour.
    pub patch_embed: PatchEmbedKind,
    /// Stages in order.
    pub stages: Vec<TinyStageConfig>,
}

impl TinyVitConfig {
    /// Total downsampling from input pixels to output tokens (4 for LiteMedSAM, 16 for MobileSAM).
    pub fn stride(&self) -> usize {
        let stem = match self.patch_embed {
            PatchEmbedKind::Strided3x3 => 4,
            PatchEmbedKind::Pointwise => 1,
        };
        stem * self
            .stages
            .iter()
            .filter_map(|s| s.merge_stride)
            .product::<usize>()
    }

    /// A short name when the encoder is a published one.
    pub fn variant(&self) -> &'static str {
        let w: Vec<usize> = self.stages.iter().map(|s| s.width).collect();
        match (self.patch_embed, w.as_slice()) {
            (PatchEmbedKind::Pointwise, [64, 128, 160, 320]) => "tiny_vit_5m (LiteMedSAM)",
            (PatchEmbedKind::Strided3x3, [64, 128, 160, 320]) => "tiny_vit_5m (MobileSAM)",
            _ => "tiny_vit custom",
        }
    }

    /// Whether any block has a depth adapter.
    pub fn has_depth_branch(&self) -> bool {
        self.stages
            .iter()
            .any(|s| s.blocks.iter().any(|b| b.depth_adapter))
    }

    /// Whether the stem and stages divide an input of `(h, w)` pixels evenly (every stride-2
    /// step sees an even side), so the output grid is `(h, w) / stride`.
    pub fn output_grid(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let s = self.stride();
        (h > 0 && w > 0 && h.is_multiple_of(s) && w.is_multiple_of(s)).then_some((h / s, w / s))
    }

    /// Infers the encoder from `image_encoder.patch_embed.seq.*` and `image_encoder.layers.*`.
    pub fn infer(ws: &WeightStore) -> Result<Self> {
        let path = ws.path();
        let shape = |k: &str| ws.shape(k);
        let s0 = shape("image_encoder.patch_embed.seq.0.c.weight")?;
        let s2 = shape("image_encoder.patch_embed.seq.2.c.weight")?;
        let patch_embed = match (s0.as_slice(), s2.as_slice()) {
            ([_, 3, 1, 1], [_, _, 1, 1]) => PatchEmbedKind::Pointwise,
            ([_, 3, 3, 3], [_, _, 3, 3]) => PatchEmbedKind::Strided3x3,
            _ => {
                return Err(cfg_err(
                    path,
                    format!(
                        "image_encoder.patch_embed.seq.0.c.weight {s0:?} / seq.2.c.weight {s2:?}: \
                         expected two 1x1 (LiteMedSAM) or two 3x3 (MobileSAM) convolutions from 3 channels"
                    ),
                ))
            }
        };
        let nstages = (0..)
            .take_while(|s| {
                let p = format!("image_encoder.layers.{s}.blocks.0");
                ws.has(&format!("{p}.conv1.c.weight")) || ws.has(&format!("{p}.attn.qkv.weight"))
            })
            .count();
        if nstages < 2 {
            return Err(cfg_err(
                path,
                "a TinyViT needs a convolutional stage and at least one attention stage \
                 (image_encoder.layers.{0,1}.blocks.0)",
            ));
        }
        let mut stages = Vec::with_capacity(nstages);
        for s in 0..nstages {
            let p = format!("image_encoder.layers.{s}");
            let conv = ws.has(&format!("{p}.blocks.0.conv1.c.weight"));
            if conv != (s == 0) {
                return Err(cfg_err(
                    path,
                    format!("{p}: stage 0 must be MBConv blocks and later stages attention blocks"),
                ));
            }
            let (width, heads, window, hidden, local_conv, blocks) = if conv {
                let depth = count_indexed(ws, &format!("{p}.blocks"), "conv1.c.weight");
                let c1 = shape(&format!("{p}.blocks.0.conv1.c.weight"))?;
                (
                    c1[1],
                    0,
                    0,
                    c1[0],
                    0,
                    vec![TinyBlockConfig::default(); depth],
                )
            } else {
                let depth = count_indexed(ws, &format!("{p}.blocks"), "attn.qkv.weight");
                let qkv = shape(&format!("{p}.blocks.0.attn.qkv.weight"))?;
                let ab_key = format!("{p}.blocks.0.attn.attention_biases");
                let ab = shape(&ab_key)?;
                let (c, heads) = (qkv[1], ab[0]);
                let window = (1..=ab[1]).find(|w| w * w == ab[1]).unwrap_or(0);
                if ab.len() != 2 || window == 0 || heads == 0 || c % heads != 0 || qkv[0] != 3 * c {
                    return Err(cfg_err(
                        path,
                        format!(
                            "{ab_key} {ab:?} with qkv {qkv:?}: expected [heads, w*w] with heads \
                             dividing {c} and qkv [3*{c}, {c}] (key dim = head dim)"
                        ),
                    ));
                }
                let fc1 = shape(&format!("{p}.blocks.0.mlp.fc1.weight"))?;
                let lc = shape(&format!("{p}.blocks.0.local_conv.c.weight"))?;
                let blocks = (0..depth)
                    .map(|j| {
                        let has = |n: &str| ws.has(&format!("{p}.blocks.{j}.{n}.D_fc1.weight"));
                        TinyBlockConfig {
                            space_adapter: has("Space_Adapter"),
                            mlp_adapter: has("MLP_Adapter"),
                            depth_adapter: has("Depth_Adapter"),
                        }
                    })
                    .collect();
                (c, heads, window, fc1[0], lc[2], blocks)
            };
            stages.push(TinyStageConfig {
                width,
                heads,
                window,
                hidden,
                local_conv,
                blocks,
                merge_stride: None,
            });
        }
        for s in 0..nstages - 1 {
            let key = format!("image_encoder.layers.{s}.downsample.conv1.c.weight");
            let c1 = shape(&key)?;
            let next = stages[s + 1].width;
            if c1.len() != 4 || c1[0] != next || c1[1] != stages[s].width {
                return Err(cfg_err(
                    path,
                    format!("{key} {c1:?}: expected [{next}, {}, 1, 1]", stages[s].width),
                ));
            }
            stages[s].merge_stride = Some(if matches!(next, 320 | 448 | 576) {
                1
            } else {
                2
            });
        }
        Ok(TinyVitConfig {
            patch_embed,
            stages,
        })
    }
}
