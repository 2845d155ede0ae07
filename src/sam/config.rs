//! The model configuration, inferred entirely from a checkpoint's tensor shapes.
//!
//! Nothing is read from names like "vit_b": the embed dim and patch size come from the patch
//! embedding, the depth from the block count, the head count from the relative-position tables'
//! head dim, each block's window from its table length (`2*S-1` with `S` the window, or the token
//! grid for global blocks), the adapters from the keys present. The mask decoder's head count
//! cannot be seen in any shape; SAM uses 8 everywhere and so do we.

use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// Per-block encoder configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Window size, or 0 for global attention.
    pub window: usize,
    /// Med-SA `Space_Adapter` present.
    pub space_adapter: bool,
    /// Med-SA `MLP_Adapter` present.
    pub mlp_adapter: bool,
    /// Med-SA `Depth_Adapter` present (SD-Trans depth branch).
    pub depth_adapter: bool,
    /// Relative-position tables are stored under Med-SA names (`rel_h`/`rel_w`).
    pub medsa_rel_names: bool,
}

impl BlockConfig {
    /// Whether the block carries any Med-SA adapter (it then follows Med-SA's op order).
    pub fn is_medsa(&self) -> bool {
        self.space_adapter || self.mlp_adapter || self.depth_adapter
    }
}

/// Per-layer decoder adapter presence (HyP-Adpt and friends, SPEC section 4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecoderLayerConfig {
    /// `Hyper_Adapter` present.
    pub hyper: bool,
    /// `MLP_Adapter` present.
    pub mlp: bool,
    /// `Cross_Adapter` present.
    pub cross: bool,
}

/// Everything needed to build and run a SAM / Med-SA model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamConfig {
    /// Patch size (16 for SAM).
    pub patch: usize,
    /// Encoder width.
    pub embed_dim: usize,
    /// Encoder attention heads.
    pub heads: usize,
    /// Encoder MLP hidden width.
    pub mlp_dim: usize,
    /// Absolute position embedding grid `(h, w)`: the model's native token grid.
    pub pos_grid: (usize, usize),
    /// Per-block configuration.
    pub blocks: Vec<BlockConfig>,
    /// Neck output channels (= decoder width in SAM).
    pub out_chans: usize,
    /// Adapter bottleneck width in the encoder (D/4 in Med-SA), if any adapter exists.
    pub adapter_dim: Option<usize>,
    /// Prompt / decoder width (256 in SAM).
    pub prompt_dim: usize,
    /// Hidden channels of the mask-input downscaling (16 in SAM).
    pub mask_in_chans: usize,
    /// Decoder two-way transformer MLP width (2048 in SAM).
    pub decoder_mlp_dim: usize,
    /// Decoder attention heads (8, not inferable from shapes).
    pub decoder_heads: usize,
    /// Downsampling of the decoder's cross attentions (2 in SAM).
    pub attention_downsample: usize,
    /// Decoder layers.
    pub decoder_layers: Vec<DecoderLayerConfig>,
    /// Number of mask tokens (4 in SAM: 1 + 3 multimask outputs).
    pub num_mask_tokens: usize,
    /// IoU head hidden width and depth.
    pub iou_head: (usize, usize),
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn count_indexed(ws: &WeightStore, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| ws.has(&format!("{prefix}.{i}.{suffix}")))
        .count()
}

impl SamConfig {
    /// The native input size in pixels `(h, w)` (1024 x 1024 for SAM).
    pub fn img_size(&self) -> (usize, usize) {
        (self.pos_grid.0 * self.patch, self.pos_grid.1 * self.patch)
    }

    /// Encoder depth.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Global-attention block indices.
    pub fn global_blocks(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.window == 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// The windowed blocks' window size (0 if every block is global).
    pub fn window(&self) -> usize {
        self.blocks.iter().map(|b| b.window).max().unwrap_or(0)
    }

    /// A short name when the encoder matches a published SAM size.
    pub fn variant(&self) -> &'static str {
        match (self.embed_dim, self.blocks.len(), self.heads) {
            (768, 12, 12) => "vit_b",
            (1024, 24, 16) => "vit_l",
            (1280, 32, 16) => "vit_h",
            _ => "custom",
        }
    }

    /// Whether any encoder block has a depth adapter (the model can run volumes).
    pub fn has_depth_branch(&self) -> bool {
        self.blocks.iter().any(|b| b.depth_adapter)
    }

    /// Whether the decoder has any adapter.
    pub fn has_decoder_adapters(&self) -> bool {
        self.decoder_layers
            .iter()
            .any(|l| l.hyper || l.mlp || l.cross)
    }

    /// Infers the configuration from the checkpoint's tensor shapes.
    pub fn infer(ws: &WeightStore) -> Result<Self> {
        let path = ws.path();
        let pe = ws.shape("image_encoder.patch_embed.proj.weight")?;
        if pe.len() != 4 || pe[1] != 3 || pe[2] != pe[3] {
            return Err(cfg_err(
                path,
                format!(
                    "image_encoder.patch_embed.proj.weight has shape {pe:?}, expected [D, 3, p, p]"
                ),
            ));
        }
        let (embed_dim, patch) = (pe[0], pe[2]);
        let pos = ws.shape("image_encoder.pos_embed")?;
        if pos.len() != 4 || pos[0] != 1 || pos[3] != embed_dim {
            return Err(cfg_err(
                path,
                format!(
                    "image_encoder.pos_embed has shape {pos:?}, expected [1, h, w, {embed_dim}]"
                ),
            ));
        }
        let pos_grid = (pos[1], pos[2]);
        let depth = count_indexed(ws, "image_encoder.blocks", "norm1.weight");
        if depth == 0 {
            return Err(cfg_err(
                path,
                "no encoder blocks (image_encoder.blocks.0.norm1.weight)",
            ));
        }
        let mut blocks = Vec::with_capacity(depth);
        let mut heads = 0;
        let mut adapter_dim = None;
        for i in 0..depth {
            let p = format!("image_encoder.blocks.{i}");
            let (key_h, medsa_rel_names) = if ws.has(&format!("{p}.attn.rel_pos_h")) {
                (format!("{p}.attn.rel_pos_h"), false)
            } else if ws.has(&format!("{p}.attn.rel_h")) {
                (format!("{p}.attn.rel_h"), true)
            } else {
                return Err(Error::MissingKey {
                    path: path.to_path_buf(),
                    key: format!("{p}.attn.rel_pos_h"),
                    expected: vec![],
                });
            };
            let rh = ws.shape(&key_h)?;
            if rh.len() != 2 || rh[1] == 0 || embed_dim % rh[1] != 0 || rh[0] % 2 == 0 {
                return Err(cfg_err(
                    path,
                    format!("{key_h} has shape {rh:?}, expected [2*S-1, head_dim] with head_dim dividing {embed_dim}"),
                ));
            }
            let h = embed_dim / rh[1];
            if heads != 0 && h != heads {
                return Err(cfg_err(
                    path,
                    format!("{key_h} implies {h} heads, block 0 has {heads}"),
                ));
            }
            heads = h;
            let s = rh[0].div_ceil(2);
            // A table spanning the whole native grid means global attention; a window equal to
            // the grid is the same computation.
            let window = if s >= pos_grid.0.max(pos_grid.1) {
                0
            } else {
                s
            };
            let has = |n: &str| ws.has(&format!("{p}.{n}.D_fc1.weight"));
            let b = BlockConfig {
                window,
                space_adapter: has("Space_Adapter"),
                mlp_adapter: has("MLP_Adapter"),
                depth_adapter: has("Depth_Adapter"),
                medsa_rel_names,
            };
            for n in ["Space_Adapter", "MLP_Adapter", "Depth_Adapter"] {
                if has(n) {
                    let s = ws.shape(&format!("{p}.{n}.D_fc1.weight"))?;
                    adapter_dim.get_or_insert(s[0]);
                }
            }
            blocks.push(b);
        }
        let mlp_dim = ws.shape("image_encoder.blocks.0.mlp.lin1.weight")?[0];
        let out_chans = ws.shape("image_encoder.neck.0.weight")?[0];

        let g = ws.shape("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")?;
        let prompt_dim = g.get(1).copied().unwrap_or(0) * 2;
        if g.len() != 2 || g[0] != 2 || prompt_dim != out_chans {
            return Err(cfg_err(
                path,
                format!(
                    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix has shape {g:?}, expected [2, {}]",
                    out_chans / 2
                ),
            ));
        }
        let mask_in_chans = ws.shape("prompt_encoder.mask_downscaling.3.weight")?[0];

        let num_mask_tokens = ws.shape("mask_decoder.mask_tokens.weight")?[0];
        let nl = count_indexed(ws, "mask_decoder.transformer.layers", "norm1.weight");
        if nl == 0 {
            return Err(cfg_err(
                path,
                "no mask decoder layers (mask_decoder.transformer.layers.0)",
            ));
        }
        let decoder_mlp_dim = ws.shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")?[0];
        let internal = ws
            .shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")?[0];
        if internal == 0 || prompt_dim % internal != 0 {
            return Err(cfg_err(
                path,
                "cross attention width does not divide the decoder width",
            ));
        }
        let decoder_layers = (0..nl)
            .map(|i| {
                let p = format!("mask_decoder.transformer.layers.{i}");
                DecoderLayerConfig {
                    hyper: ws.has(&format!("{p}.Hyper_Adapter.D_fc1.weight")),
                    mlp: ws.has(&format!("{p}.MLP_Adapter.D_fc1.weight")),
                    cross: ws.has(&format!("{p}.Cross_Adapter.D_fc1.weight")),
                }
            })
            .collect();
        let iou_depth = count_indexed(ws, "mask_decoder.iou_prediction_head.layers", "weight");
        let iou_hidden = ws.shape("mask_decoder.iou_prediction_head.layers.0.weight")?[0];
        Ok(SamConfig {
            patch,
            embed_dim,
            heads,
            mlp_dim,
            pos_grid,
            blocks,
            out_chans,
            adapter_dim,
            prompt_dim,
            mask_in_chans,
            decoder_mlp_dim,
            decoder_heads: 8,
            attention_downsample: prompt_dim / internal,
            decoder_layers,
            num_mask_tokens,
            iou_head: (iou_hidden, iou_depth),
        })
    }
}
