//! SAM's mask decoder: a two-way transformer between prompt tokens and image tokens, then
//! upscaling and per-mask-token hypernetworks, plus the Med-SA decoder adapters (SPEC section 4).
//!
//! Tokens: `[iou, mask_0..T-1, sparse prompts]` `[B, 1+T+Nt, C]`; image tokens `[B, h*w, C]`
//! (embedding + dense prompt), with the dense positional encoding `[1, h*w, C]`. Masks come out
//! as `[B, T, 4h, 4w]` logits and IoU scores `[B, T]`, then the multimask slice is taken.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::medsa::adapter::Adapter;
use crate::medsa::hyper_adapter::HyperAdapter;
use crate::nn::{ConvTranspose2x2, LayerNorm, Linear, Mlp};
use crate::sam::config::SamConfig;
use crate::sam::image_encoder::MLP_ADAPTER_SCALE;
use crate::weights::WeightStore;

/// Attention with separate q/k/v projections to an internal width (`C / downsample`).
pub struct DecoderAttention<B: Backend> {
    /// `C -> internal`.
    pub q_proj: Linear<B>,
    /// `C -> internal`.
    pub k_proj: Linear<B>,
    /// `C -> internal`.
    pub v_proj: Linear<B>,
    /// `internal -> C`.
    pub out_proj: Linear<B>,
    /// Heads.
    pub heads: usize,
}

impl<B: Backend> DecoderAttention<B> {
    fn load(
        be: &B,
        ws: &mut WeightStore,
        p: &str,
        c: usize,
        internal: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(DecoderAttention {
            q_proj: Linear::load(be, ws, &format!("{p}.q_proj"), c, internal, true)?,
            k_proj: Linear::load(be, ws, &format!("{p}.k_proj"), c, internal, true)?,
            v_proj: Linear::load(be, ws, &format!("{p}.v_proj"), c, internal, true)?,
            out_proj: Linear::load(be, ws, &format!("{p}.out_proj"), internal, c, true)?,
            heads,
        })
    }

    /// `q` `[B, Lq, C]`, `k`, `v` `[B, Lk, C]` -> `[B, Lq, C]`.
    pub fn forward(
        &self,
        be: &B,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
    ) -> Result<B::Tensor> {
        let q = self.q_proj.forward(be, q, Act::None)?;
        let k = self.k_proj.forward(be, k, Act::None)?;
        let v = self.v_proj.forward(be, v, Act::None)?;
        let internal = *be.dims(&q).last().unwrap_or(&1);
        let scale = ((internal / self.heads) as f32).powf(-0.5);
        let o = be.attention(&q, &k, &v, self.heads, scale, None)?;
        self.out_proj.forward(be, &o, Act::None)
    }
}

/// One two-way attention block.
pub struct TwoWayBlock<B: Backend> {
    /// Token self-attention.
    pub self_attn: DecoderAttention<B>,
    /// Norms 1-4.
    pub norm1: LayerNorm<B>,
    /// Tokens attend to the image.
    pub cross_t2i: DecoderAttention<B>,
    /// See `norm1`.
    pub norm2: LayerNorm<B>,
    /// MLP (ReLU).
    pub lin1: Linear<B>,
    /// MLP second layer.
    pub lin2: Linear<B>,
    /// See `norm1`.
    pub norm3: LayerNorm<B>,
    /// See `norm1`.
    pub norm4: LayerNorm<B>,
    /// The image attends to the tokens.
    pub cross_i2t: DecoderAttention<B>,
    /// The first block adds no positional encoding before self-attention.
    pub skip_first_layer_pe: bool,
    /// HyP-Adpt on the tokens after token-to-image attention.
    pub hyper_adapter: Option<HyperAdapter<B>>,
    /// Plain adapter parallel to the MLP (no skip, scale 0.5).
    pub mlp_adapter: Option<Adapter<B>>,
    /// Plain adapter with skip on the image tokens after image-to-token attention.
    pub cross_adapter: Option<Adapter<B>>,
}

impl<B: Backend> TwoWayBlock<B> {
    /// Returns the updated `(queries, keys)`.
    pub fn forward(
        &self,
        be: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        query_pe: &B::Tensor,
        key_pe: &B::Tensor,
        sparse: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let mut q = if self.skip_first_layer_pe {
            self.self_attn.forward(be, queries, queries, queries)?
        } else {
            let qp = be.add_scaled(queries, 1.0, query_pe, 1.0)?;
            let a = self.self_attn.forward(be, &qp, &qp, queries)?;
            be.add_scaled(queries, 1.0, &a, 1.0)?
        };
        q = self.norm1.forward(be, &q)?;

        let qp = be.add_scaled(&q, 1.0, query_pe, 1.0)?;
        let kp = be.add_scaled(keys, 1.0, key_pe, 1.0)?;
        let a = self.cross_t2i.forward(be, &qp, &kp, keys)?;
        q = be.add_scaled(&q, 1.0, &a, 1.0)?;
        if let Some(h) = &self.hyper_adapter {
            q = h.forward(be, &q, sparse)?;
        }
        q = self.norm2.forward(be, &q)?;

        let m = self.lin1.forward(be, &q, Act::Relu)?;
        let m = self.lin2.forward(be, &m, Act::None)?;
        let mut q2 = be.add_scaled(&q, 1.0, &m, 1.0)?;
        if let Some(ma) = &self.mlp_adapter {
            let y = ma.forward(be, &q)?;
            q2 = be.add_scaled(&q2, 1.0, &y, MLP_ADAPTER_SCALE)?;
        }
        let q = self.norm3.forward(be, &q2)?;

        let qp = be.add_scaled(&q, 1.0, query_pe, 1.0)?;
        let a = self.cross_i2t.forward(be, &kp, &qp, &q)?;
        let mut k = be.add_scaled(keys, 1.0, &a, 1.0)?;
        if let Some(ca) = &self.cross_adapter {
            k = ca.forward(be, &k)?;
        }
        let k = self.norm4.forward(be, &k)?;
        Ok((q, k))
    }
}

/// Output of the mask decoder.
pub struct DecoderOutput<B: Backend> {
    /// `[B, T', 4h, 4w]` logits after the multimask slice.
    pub low_res_masks: B::Tensor,
    /// `[B, T']`.
    pub iou_predictions: B::Tensor,
}

/// The mask decoder.
pub struct MaskDecoder<B: Backend> {
    /// `[1 + T, C]`: the IoU token then the mask tokens.
    pub output_tokens: B::Tensor,
    /// Two-way blocks.
    pub layers: Vec<TwoWayBlock<B>>,
    /// Final token-to-image attention.
    pub final_attn: DecoderAttention<B>,
    /// Final norm.
    pub norm_final: LayerNorm<B>,
    /// Upscaling: transposed conv -> LN2d -> GELU -> transposed conv -> GELU.
    pub up1: ConvTranspose2x2<B>,
    /// See `up1`.
    pub up_norm: LayerNorm<B>,
    /// See `up1`.
    pub up2: ConvTranspose2x2<B>,
    /// One hypernetwork MLP per mask token.
    pub hyper_mlps: Vec<Mlp<B>>,
    /// IoU head.
    pub iou_head: Mlp<B>,
    /// Mask tokens T.
    pub num_mask_tokens: usize,
}

impl<B: Backend> MaskDecoder<B> {
    /// Loads `mask_decoder.*`.
    pub fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig) -> Result<Self> {
        let c = cfg.prompt_dim;
        let t = cfg.num_mask_tokens;
        let internal = c / cfg.attention_downsample;
        let heads = cfg.decoder_heads;
        let iou = ws.take("mask_decoder.iou_token.weight", &[1, c])?;
        let mt = ws.take("mask_decoder.mask_tokens.weight", &[t, c])?;
        let mut tok = iou.into_vec();
        tok.extend_from_slice(mt.data());
        let output_tokens = be.upload(&crate::Tensor::from_vec(tok, &[1, 1 + t, c])?)?;
        let mut layers = Vec::new();
        for (i, lc) in cfg.decoder_layers.iter().enumerate() {
            let p = format!("mask_decoder.transformer.layers.{i}");
            let ln = |ws: &mut WeightStore, n: &str| {
                LayerNorm::load(be, ws, &format!("{p}.{n}"), c, 1e-5)
            };
            layers.push(TwoWayBlock {
                self_attn: DecoderAttention::load(be, ws, &format!("{p}.self_attn"), c, c, heads)?,
                norm1: ln(ws, "norm1")?,
                cross_t2i: DecoderAttention::load(
                    be,
                    ws,
                    &format!("{p}.cross_attn_token_to_image"),
                    c,
                    internal,
                    heads,
                )?,
                norm2: ln(ws, "norm2")?,
                lin1: Linear::load(
                    be,
                    ws,
                    &format!("{p}.mlp.lin1"),
                    c,
                    cfg.decoder_mlp_dim,
                    true,
                )?,
                lin2: Linear::load(
                    be,
                    ws,
                    &format!("{p}.mlp.lin2"),
                    cfg.decoder_mlp_dim,
                    c,
                    true,
                )?,
                norm3: ln(ws, "norm3")?,
                norm4: ln(ws, "norm4")?,
                cross_i2t: DecoderAttention::load(
                    be,
                    ws,
                    &format!("{p}.cross_attn_image_to_token"),
                    c,
                    internal,
                    heads,
                )?,
                skip_first_layer_pe: i == 0,
                hyper_adapter: if lc.hyper {
                    Some(HyperAdapter::load(
                        be,
                        ws,
                        &format!("{p}.Hyper_Adapter"),
                        c,
                    )?)
                } else {
                    None
                },
                mlp_adapter: Adapter::load_opt(be, ws, &format!("{p}.MLP_Adapter"), c, false)?,
                cross_adapter: Adapter::load_opt(be, ws, &format!("{p}.Cross_Adapter"), c, true)?,
            });
        }
        let (ih, idepth) = cfg.iou_head;
        let mut iou_dims = vec![c];
        iou_dims.extend(std::iter::repeat_n(ih, idepth.saturating_sub(1)));
        iou_dims.push(t);
        Ok(MaskDecoder {
            output_tokens,
            layers,
            final_attn: DecoderAttention::load(
                be,
                ws,
                "mask_decoder.transformer.final_attn_token_to_image",
                c,
                internal,
                heads,
            )?,
            norm_final: LayerNorm::load(
                be,
                ws,
                "mask_decoder.transformer.norm_final_attn",
                c,
                1e-5,
            )?,
            up1: ConvTranspose2x2::load(be, ws, "mask_decoder.output_upscaling.0", c, c / 4)?,
            up_norm: LayerNorm::load(be, ws, "mask_decoder.output_upscaling.1", c / 4, 1e-6)?,
            up2: ConvTranspose2x2::load(be, ws, "mask_decoder.output_upscaling.3", c / 4, c / 8)?,
            hyper_mlps: (0..t)
                .map(|i| {
                    Mlp::load(
                        be,
                        ws,
                        &format!("mask_decoder.output_hypernetworks_mlps.{i}"),
                        &[c, c, c, c / 8],
                    )
                })
                .collect::<Result<_>>()?,
            iou_head: Mlp::load(be, ws, "mask_decoder.iou_prediction_head", &iou_dims)?,
            num_mask_tokens: t,
        })
    }

    /// Predicts all `T` masks: embeddings `[B, h, w, C]` (channels-last), dense prompts
    /// `[B, h, w, C]` (or one broadcast `[1, 1, 1, C]` row), dense PE `[1, h*w, C]`, sparse prompts `[B, Nt, C]`. Returns masks
    /// `[B, T, 4h, 4w]` and IoU `[B, T]`.
    pub fn predict(
        &self,
        be: &B,
        embeddings: &B::Tensor,
        dense: &B::Tensor,
        dense_pe: &B::Tensor,
        sparse: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let s = be.dims(embeddings).to_vec();
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let t = self.num_mask_tokens;
        let out_tok = be.index_select0(&self.output_tokens, &vec![0; b])?;
        let tokens = be.concat(&[&out_tok, sparse], 1)?;
        let src = be.add_scaled(embeddings, 1.0, dense, 1.0)?;
        let mut keys = be.reshape(&src, &[b, h * w, c])?;
        let mut queries = tokens.clone();
        for layer in &self.layers {
            let (q, k) = layer.forward(be, &queries, &keys, &tokens, dense_pe, sparse)?;
            queries = q;
            keys = k;
        }
        let qp = be.add_scaled(&queries, 1.0, &tokens, 1.0)?;
        let kp = be.add_scaled(&keys, 1.0, dense_pe, 1.0)?;
        let a = self.final_attn.forward(be, &qp, &kp, &keys)?;
        let hs = self
            .norm_final
            .forward(be, &be.add_scaled(&queries, 1.0, &a, 1.0)?)?;

        let src = be.reshape(&keys, &[b, h, w, c])?;
        let up = self.up1.forward(be, &src)?;
        let up = be.activate(&self.up_norm.forward(be, &up)?, Act::Gelu)?;
        let up = be.activate(&self.up2.forward(be, &up)?, Act::Gelu)?; // [B, 4h, 4w, c/8]
        let cu = be.dims(&up)[3];
        let up = be.reshape(&up, &[b, 16 * h * w, cu])?;
        let hyper: Vec<B::Tensor> = (0..t)
            .map(|i| self.hyper_mlps[i].forward(be, &be.narrow(&hs, 1, 1 + i, 1)?))
            .collect::<Result<_>>()?;
        let hyper_in = be.concat(&hyper.iter().collect::<Vec<_>>(), 1)?; // [B, T, c/8]
        let masks = be.matmul(&hyper_in, &up, true)?; // [B, T, 16hw]
        let masks = be.reshape(&masks, &[b, t, 4 * h, 4 * w])?;
        let iou = self.iou_head.forward(be, &be.narrow(&hs, 1, 0, 1)?)?;
        let iou = be.reshape(&iou, &[b, t])?;
        Ok((masks, iou))
    }
}
