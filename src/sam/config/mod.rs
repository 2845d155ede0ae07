//! The model configuration, inferred entirely from a checkpoint's tensor shapes.
//!
//! Nothing is read from names like "vit_b": the embed dim and patch size come from the patch
//! embedding, the depth from the block count, the head count from the relative-position tables'
//! head dim, each block's window from its table length (`2*S-1` with `S` the window, or the token
//! grid for global blocks), the adapters from the keys present. The mask decoder's head count
//! cannot be seen in any shape; SAM uses 8 everywhere and so do we.
//!
//! Checkpoints saved by the public Med-SA code (SPEC section 7) differ in two ways that shapes
//! and names reveal. Their position embedding is always stored at `1024 / patch` while every
//! block's rel-pos tables are sized for the training input, so the native grid is read from the
//! largest (global) tables when they are smaller than the stored embedding. Their decoder block
//! MLPs are named `mlp.layers.0.0` / `mlp.fc`, which selects the reference decoder flavour.

use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::WeightStore;

mod tiny_vit;

pub use tiny_vit::{TinyBlockConfig, TinyStageConfig, TinyVitConfig, TINY_VIT_KEY};

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

/// Which two-way attention block the mask decoder computes (SPEC section 7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecoderFlavour {
    /// SAM's block: the first block's self-attention replaces the queries (no residual); later
    /// blocks add the prompt PE to queries and keys only.
    #[default]
    Sam,
    /// The public Med-SA code's block: self-attention always has a residual, and later blocks
    /// add the PE to the token stream itself (so it enters values and residual).
    Medsa,
}

impl DecoderFlavour {
    /// The name used on the command line and in metadata (`sam`, `medsa`).
    pub fn name(self) -> &'static str {
        match self {
            DecoderFlavour::Sam => "sam",
            DecoderFlavour::Medsa => "medsa",
        }
    }
}

impl std::fmt::Display for DecoderFlavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DecoderFlavour {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sam" => Ok(DecoderFlavour::Sam),
            "medsa" => Ok(DecoderFlavour::Medsa),
            other => Err(Error::Input(format!(
                "decoder flavour \"{other}\": expected \"sam\" (SAM's two-way block) or \"medsa\" (the public Med-SA code's)"
            ))),
        }
    }
}

/// TinyViT's patch embedding (SPEC section 8), told apart by its kernel shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchEmbedKind {
    /// MobileSAM: two 3x3 stride-2 convolutions (1024 input -> 256 x 256 tokens).
    Strided3x3,
    /// LiteMedSAM: two 1x1 stride-1 convolutions (256 input -> 256 x 256 tokens).
    Pointwise,
}

impl PatchEmbedKind {
    /// Kernel, stride and padding of both stem convolutions.
    pub fn geometry(self) -> (usize, usize, usize) {
        match self {
            PatchEmbedKind::Strided3x3 => (3, 2, 1),
            PatchEmbedKind::Pointwise => (1, 1, 0),
        }
    }
}

/// The key whose presence marks a decoder saved by the public Med-SA code (its block MLP).
pub const MEDSA_DECODER_KEY: &str = "mask_decoder.transformer.layers.0.mlp.layers.0.0.weight";

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
    /// The model's native token grid `(h, w)`: the global blocks' rel-pos tables span it.
    pub pos_grid: (usize, usize),
    /// The stored absolute position embedding's grid when it differs from `pos_grid` (the
    /// public Med-SA code always stores it at `1024 / patch`); it is resized at run time.
    pub pos_embed_grid: Option<(usize, usize)>,
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
    /// The decoder's two-way block (inferred from the key names; can be forced).
    pub decoder_flavour: DecoderFlavour,
    /// A TinyViT image encoder (SPEC section 8) instead of the ViT. Then `patch` is its total
    /// stride, `embed_dim` and `heads` its last stage's, `blocks` is empty and `pos_grid` is
    /// the 64 x 64 output grid the reference code fixes (256 input for LiteMedSAM, 1024 for
    /// MobileSAM).
    pub tiny_vit: Option<TinyVitConfig>,
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
    /// The grid of the stored `image_encoder.pos_embed`.
    pub fn pos_embed_grid(&self) -> (usize, usize) {
        self.pos_embed_grid.unwrap_or(self.pos_grid)
    }

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
        if let Some(t) = &self.tiny_vit {
            return t.variant();
        }
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
            || self.tiny_vit.as_ref().is_some_and(|t| t.has_depth_branch())
    }

    /// Whether the decoder has any adapter.
    pub fn has_decoder_adapters(&self) -> bool {
        self.decoder_layers
            .iter()
            .any(|l| l.hyper || l.mlp || l.cross)
    }

    /// Infers the configuration from the checkpoint's tensor shapes.
    pub fn infer(ws: &WeightStore) -> Result<Self> {
        if ws.has(TINY_VIT_KEY) {
            let t = TinyVitConfig::infer(ws)?;
            let last = t
                .stages
                .last()
                .cloned()
                .ok_or_else(|| cfg_err(ws.path(), "no stages"))?;
            let out_chans = ws.shape("image_encoder.neck.0.weight")?[0];
            let adapter_dim = t.stages.iter().enumerate().find_map(|(s, st)| {
                st.blocks.iter().enumerate().find_map(|(j, b)| {
                    let n = if b.space_adapter {
                        "Space_Adapter"
                    } else if b.mlp_adapter {
                        "MLP_Adapter"
                    } else if b.depth_adapter {
                        "Depth_Adapter"
                    } else {
                        return None;
                    };
                    ws.shape(&format!(
                        "image_encoder.layers.{s}.blocks.{j}.{n}.D_fc1.weight"
                    ))
                    .ok()
                    .map(|s| s[0])
                })
            });
            let encoder = EncoderShape {
                patch: t.stride(),
                embed_dim: last.width,
                heads: last.heads,
                mlp_dim: last.hidden,
                pos_grid: (64, 64),
                pos_embed_grid: None,
                blocks: Vec::new(),
                out_chans,
                adapter_dim,
            };
            return Self::infer_rest(ws, encoder, Some(t));
        }
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
        let stored_grid = (pos[1], pos[2]);
        let depth = count_indexed(ws, "image_encoder.blocks", "norm1.weight");
        if depth == 0 {
            return Err(cfg_err(
                path,
                "no encoder blocks (image_encoder.blocks.0.norm1.weight)",
            ));
        }
        // Per block: the spans (S_h, S_w) of its rel-pos tables (`2*S-1` rows each).
        let mut spans = Vec::with_capacity(depth);
        let mut heads = 0;
        let mut adapter_dim = None;
        let mut flags = Vec::with_capacity(depth);
        for i in 0..depth {
            let p = format!("image_encoder.blocks.{i}");
            let medsa_rel_names = !ws.has(&format!("{p}.attn.rel_pos_h"));
            let mut span = [0usize; 2];
            for (k, axis) in ["h", "w"].into_iter().enumerate() {
                let key = if medsa_rel_names {
                    format!("{p}.attn.rel_{axis}")
                } else {
                    format!("{p}.attn.rel_pos_{axis}")
                };
                if !ws.has(&key) {
                    return Err(Error::MissingKey {
                        path: path.to_path_buf(),
                        key: format!("{p}.attn.rel_pos_{axis}` (or `{p}.attn.rel_{axis}"),
                        expected: None,
                    });
                }
                let r = ws.shape(&key)?;
                if r.len() != 2 || r[1] == 0 || embed_dim % r[1] != 0 || r[0] % 2 == 0 {
                    return Err(cfg_err(
                        path,
                        format!("{key} has shape {r:?}, expected [2*S-1, head_dim] with head_dim dividing {embed_dim}"),
                    ));
                }
                let h = embed_dim / r[1];
                if heads != 0 && h != heads {
                    return Err(cfg_err(
                        path,
                        format!("{key} implies {h} heads, block 0 has {heads}"),
                    ));
                }
                heads = h;
                span[k] = r[0].div_ceil(2);
            }
            spans.push((span[0], span[1]));
            let has = |n: &str| ws.has(&format!("{p}.{n}.D_fc1.weight"));
            for n in ["Space_Adapter", "MLP_Adapter", "Depth_Adapter"] {
                if has(n) {
                    let s = ws.shape(&format!("{p}.{n}.D_fc1.weight"))?;
                    adapter_dim.get_or_insert(s[0]);
                }
            }
            flags.push(BlockConfig {
                window: 0,
                space_adapter: has("Space_Adapter"),
                mlp_adapter: has("MLP_Adapter"),
                depth_adapter: has("Depth_Adapter"),
                medsa_rel_names,
            });
        }
        let (pos_grid, windows) = block_windows(&spans, stored_grid, embed_dim, depth, heads);
        let blocks: Vec<BlockConfig> = flags
            .into_iter()
            .zip(windows)
            .map(|(b, window)| BlockConfig { window, ..b })
            .collect();
        let pos_embed_grid = (stored_grid != pos_grid).then_some(stored_grid);
        let mlp_dim = ws.shape("image_encoder.blocks.0.mlp.lin1.weight")?[0];
        let out_chans = ws.shape("image_encoder.neck.0.weight")?[0];
        let encoder = EncoderShape {
            patch,
            embed_dim,
            heads,
            mlp_dim,
            pos_grid,
            pos_embed_grid,
            blocks,
            out_chans,
            adapter_dim,
        };
        Self::infer_rest(ws, encoder, None)
    }

    /// The prompt encoder and mask decoder, after either image encoder.
    fn infer_rest(
        ws: &WeightStore,
        encoder: EncoderShape,
        tiny_vit: Option<TinyVitConfig>,
    ) -> Result<Self> {
        let path = ws.path();
        let EncoderShape {
            patch,
            embed_dim,
            heads,
            mlp_dim,
            pos_grid,
            pos_embed_grid,
            blocks,
            out_chans,
            adapter_dim,
        } = encoder;

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
        let decoder_mlp_dim = match ws.has(MEDSA_DECODER_KEY) {
            true => ws.shape(MEDSA_DECODER_KEY)?[0],
            false => ws.shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")?[0],
        };
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
            pos_embed_grid,
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
            decoder_flavour: if ws.has(MEDSA_DECODER_KEY) {
                DecoderFlavour::Medsa
            } else {
                DecoderFlavour::Sam
            },
            tiny_vit,
        })
    }
}

/// The image encoder's part of [`SamConfig`].
struct EncoderShape {
    patch: usize,
    embed_dim: usize,
    heads: usize,
    mlp_dim: usize,
    pos_grid: (usize, usize),
    pos_embed_grid: Option<(usize, usize)>,
    blocks: Vec<BlockConfig>,
    out_chans: usize,
    adapter_dim: Option<usize>,
}

/// The native token grid and each block's window (0: global) from the blocks' rel-pos spans
/// and the stored position embedding's grid.
///
/// SAM sizes global tables for the grid the position embedding has, so a span that reaches it
/// means global attention and every smaller span is a window. The public Med-SA code stores
/// the embedding at `1024 / patch` whatever it trains at, so spans all smaller than the stored
/// grid mean a smaller native size: the largest span is then the native grid and the blocks
/// with it are global. When every block has that same span (a reference checkpoint trained at
/// `window * patch`, e.g. 224), windowed and global blocks compute the same thing at the native
/// size; for a published SAM encoder the published global blocks are reported, so that other
/// input sizes resize the right tables. Elsewhere all-equal spans keep SAM's reading.
fn block_windows(
    spans: &[(usize, usize)],
    stored: (usize, usize),
    embed_dim: usize,
    depth: usize,
    heads: usize,
) -> ((usize, usize), Vec<usize>) {
    let max = spans
        .iter()
        .fold((0, 0), |m, s| (m.0.max(s.0), m.1.max(s.1)));
    let sam_reading = |grid: (usize, usize)| -> Vec<usize> {
        spans
            .iter()
            .map(|s| if s.0 >= grid.0.max(grid.1) { 0 } else { s.0 })
            .collect()
    };
    if max.0 >= stored.0 || max.1 >= stored.1 {
        return (stored, sam_reading(stored));
    }
    if spans.iter().any(|s| *s != max) {
        let windows = spans
            .iter()
            .map(|s| if *s == max { 0 } else { s.0 })
            .collect();
        return (max, windows);
    }
    match published_global_blocks(embed_dim, depth, heads) {
        Some(global) => (
            max,
            (0..depth)
                .map(|i| if global.contains(&i) { 0 } else { max.0 })
                .collect(),
        ),
        None => (stored, sam_reading(stored)),
    }
}

/// The global-attention blocks of the published SAM encoders (SPEC section 1).
fn published_global_blocks(embed_dim: usize, depth: usize, heads: usize) -> Option<[usize; 4]> {
    match (embed_dim, depth, heads) {
        (768, 12, 12) => Some([2, 5, 8, 11]),
        (1024, 24, 16) => Some([5, 11, 17, 23]),
        (1280, 32, 16) => Some([7, 15, 23, 31]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::block_windows;

    /// vit_b's spans at an input of `size` with SAM's window 14: windowed blocks 14, the global
    /// blocks 2, 5, 8, 11 the token grid.
    fn vit_b_spans(size: usize) -> Vec<(usize, usize)> {
        let g = size / 16;
        (0..12)
            .map(|i| if i % 3 == 2 { (g, g) } else { (14, 14) })
            .collect()
    }

    #[test]
    fn official_sam_reads_its_grid_from_the_position_embedding() {
        let (grid, w) = block_windows(&vit_b_spans(1024), (64, 64), 768, 12, 12);
        assert_eq!(grid, (64, 64));
        assert_eq!(w, [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]);
    }

    #[test]
    fn reference_checkpoint_at_256_reads_its_grid_from_the_global_tables() {
        // The public Med-SA code stores pos_embed at 64x64 whatever it trains at.
        let (grid, w) = block_windows(&vit_b_spans(256), (64, 64), 768, 12, 12);
        assert_eq!(grid, (16, 16));
        assert_eq!(w, [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]);
    }

    #[test]
    fn reference_checkpoint_at_the_window_size_keeps_the_published_global_blocks() {
        // At 224 every table spans 14: only the published layout tells the blocks apart.
        let (grid, w) = block_windows(&vit_b_spans(224), (64, 64), 768, 12, 12);
        assert_eq!(grid, (14, 14));
        assert_eq!(w, [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]);
        // A custom encoder with equal tables keeps SAM's reading (all windowed).
        let (grid, w) = block_windows(&[(4, 4), (4, 4)], (8, 8), 32, 2, 2);
        assert_eq!(grid, (8, 8));
        assert_eq!(w, [4, 4]);
    }

    #[test]
    fn small_models_with_a_global_block_at_the_embedding_grid_are_unchanged() {
        let (grid, w) = block_windows(&[(4, 4), (6, 6)], (6, 6), 32, 2, 2);
        assert_eq!((grid, w), ((6, 6), vec![4, 0]));
    }
}
