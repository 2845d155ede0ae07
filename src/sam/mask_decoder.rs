//! SAM's mask decoder: a two-way transformer between prompt tokens and image tokens, then
//! upscaling and per-mask-token hypernetworks, plus the Med-SA decoder adapters (SPEC section 4).
//!
//! Tokens: `[iou, mask_0..T-1, sparse prompts]` `[B, 1+T+Nt, C]`; image tokens `[B, h*w, C]`
//! (embedding + dense prompt), with the dense positional encoding `[1, h*w, C]`. Masks come out
//! as `[B, T, 4h, 4w]` logits and IoU scores `[B, T]`, then the multimask slice is taken.
//! The two-way blocks, in SAM's and the reference code's flavour, are in `sam::two_way`.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::nn::{ConvTranspose2x2, LayerNorm, Linear, Mlp};
use crate::sam::config::SamConfig;
use crate::sam::two_way::add;
pub use crate::sam::two_way::{TwoWayBlock, TwoWayCache};
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
    pub(crate) fn load(
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
        // The training pass computes exactly this; its cache holds only references.
        Ok(self.forward_t(be, q, k, v)?.0)
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
        let layers = (0..cfg.decoder_layers.len())
            .map(|i| TwoWayBlock::load(be, ws, cfg, i))
            .collect::<Result<Vec<_>>>()?;
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
        let (masks, iou, _) = self.predict_t(be, embeddings, dense, dense_pe, sparse)?;
        Ok((masks, iou))
    }
}

// ----- training: forward with caches, backward --------------------------------------------------

use crate::nn::{dx, Grads, MlpCache, Param, ParamList};

/// What [`DecoderAttention::forward_t`] keeps.
pub struct DecAttnCache<T> {
    qi: T,
    ki: T,
    vi: T,
    q: T,
    k: T,
    v: T,
    o: T,
}

impl<B: Backend> DecoderAttention<B> {
    /// Appends the parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.q_proj.params(out);
        self.k_proj.params(out);
        self.v_proj.params(out);
        self.out_proj.params(out);
    }

    /// Forward keeping what backward needs.
    pub fn forward_t(
        &self,
        be: &B,
        qi: &B::Tensor,
        ki: &B::Tensor,
        vi: &B::Tensor,
    ) -> Result<(B::Tensor, DecAttnCache<B::Tensor>)> {
        let q = self.q_proj.forward(be, qi, Act::None)?;
        let k = self.k_proj.forward(be, ki, Act::None)?;
        let v = self.v_proj.forward(be, vi, Act::None)?;
        let internal = *be.dims(&q).last().unwrap_or(&1);
        let scale = ((internal / self.heads) as f32).powf(-0.5);
        let o = be.attention(&q, &k, &v, self.heads, scale, None)?;
        let y = self.out_proj.forward(be, &o, Act::None)?;
        let c = DecAttnCache {
            qi: qi.clone(),
            ki: ki.clone(),
            vi: vi.clone(),
            q,
            k,
            v,
            o,
        };
        Ok((y, c))
    }

    /// Gradients of the three inputs `(dq, dk, dv)`.
    pub fn backward(
        &self,
        be: &B,
        c: &DecAttnCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        let d_o = dx(self.out_proj.backward_pre(be, &c.o, dy, grads, true)?)?;
        let internal = *be.dims(&c.q).last().unwrap_or(&1);
        let scale = ((internal / self.heads) as f32).powf(-0.5);
        let g = be.attention_backward(&c.q, &c.k, &c.v, &c.o, &d_o, self.heads, scale, None)?;
        let dq = dx(self.q_proj.backward_pre(be, &c.qi, &g.dq, grads, true)?)?;
        let dk = dx(self.k_proj.backward_pre(be, &c.ki, &g.dk, grads, true)?)?;
        let dv = dx(self.v_proj.backward_pre(be, &c.vi, &g.dv, grads, true)?)?;
        Ok((dq, dk, dv))
    }
}

/// What [`MaskDecoder::predict_t`] keeps.
pub struct DecoderCache<T> {
    b: usize,
    grid: (usize, usize),
    sparse_len: usize,
    layers: Vec<TwoWayCache<T>>,
    final_attn: DecAttnCache<T>,
    hs_in: T,
    src: T,
    u1: T,
    u1n: T,
    u1g: T,
    u2: T,
    up: T,
    hyper: Vec<MlpCache<T>>,
    hyper_in: T,
    iou: MlpCache<T>,
}

impl<B: Backend> MaskDecoder<B> {
    /// Appends the parameters (the IoU and mask tokens as `mask_decoder.output_tokens`).
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        out.push((
            OUTPUT_TOKENS.to_string(),
            Param::Dev(&mut self.output_tokens),
        ));
        for l in &mut self.layers {
            l.params(out);
        }
        self.final_attn.params(out);
        self.norm_final.params(out);
        self.up1.params(out);
        self.up_norm.params(out);
        self.up2.params(out);
        for m in &mut self.hyper_mlps {
            m.params(out);
        }
        self.iou_head.params(out);
    }

    /// [`MaskDecoder::predict`] keeping what backward needs.
    #[allow(clippy::type_complexity)]
    pub fn predict_t(
        &self,
        be: &B,
        embeddings: &B::Tensor,
        dense: &B::Tensor,
        dense_pe: &B::Tensor,
        sparse: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor, DecoderCache<B::Tensor>)> {
        let s = be.dims(embeddings).to_vec();
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let t = self.num_mask_tokens;
        let out_tok = be.index_select0(&self.output_tokens, &vec![0; b])?;
        let tokens = be.concat(&[&out_tok, sparse], 1)?;
        let src = be.add_scaled(embeddings, 1.0, dense, 1.0)?;
        let mut keys = be.reshape(&src, &[b, h * w, c])?;
        let mut queries = tokens.clone();
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (q, k, lc) = layer.forward_t(be, &queries, &keys, &tokens, dense_pe, sparse)?;
            queries = q;
            keys = k;
            layers.push(lc);
        }
        let qp = add(be, &queries, &tokens)?;
        let kp = add(be, &keys, dense_pe)?;
        let (a, final_attn) = self.final_attn.forward_t(be, &qp, &kp, &keys)?;
        let hs_in = add(be, &queries, &a)?;
        let hs = self.norm_final.forward(be, &hs_in)?;
        let src = be.reshape(&keys, &[b, h, w, c])?;
        let u1 = self.up1.forward(be, &src)?;
        let u1n = self.up_norm.forward(be, &u1)?;
        let u1g = be.activate(&u1n, Act::Gelu)?;
        let u2 = self.up2.forward(be, &u1g)?;
        let up = be.activate(&u2, Act::Gelu)?;
        let cu = be.dims(&up)[3];
        let up = be.reshape(&up, &[b, 16 * h * w, cu])?;
        let hyper: Vec<MlpCache<B::Tensor>> = (0..t)
            .map(|i| self.hyper_mlps[i].forward_t(be, &be.narrow(&hs, 1, 1 + i, 1)?))
            .collect::<Result<_>>()?;
        let outs: Vec<&B::Tensor> = hyper.iter().map(|m| &m.acts[m.acts.len() - 1]).collect();
        let hyper_in = be.concat(&outs, 1)?;
        let masks = be.matmul(&hyper_in, &up, true)?;
        let masks = be.reshape(&masks, &[b, t, 4 * h, 4 * w])?;
        let iou = self.iou_head.forward_t(be, &be.narrow(&hs, 1, 0, 1)?)?;
        let iou_out = be.reshape(&iou.acts[iou.acts.len() - 1], &[b, t])?;
        let sparse_len = be.dims(sparse)[1];
        let c = DecoderCache {
            b,
            grid: (h, w),
            sparse_len,
            layers,
            final_attn,
            hs_in,
            src,
            u1,
            u1n,
            u1g,
            u2,
            up,
            hyper,
            hyper_in,
            iou,
        };
        Ok((masks, iou_out, c))
    }

    /// Accumulates the decoder's gradients from `d(masks)` `[B, T, 4h, 4w]` and optionally
    /// `d(iou)` `[B, T]`; returns `d(embeddings)` `[B, h, w, C]` (channels-last) when
    /// `need_demb`.
    pub fn backward(
        &self,
        be: &B,
        c: &DecoderCache<B::Tensor>,
        dmasks: &B::Tensor,
        diou: Option<&B::Tensor>,
        grads: &mut Grads<B>,
        need_demb: bool,
    ) -> Result<Option<B::Tensor>> {
        let (b, (h, w), t) = (c.b, c.grid, self.num_mask_tokens);
        let cch = be.dims(&c.hs_in)[2];
        let dm = be.reshape(dmasks, &[b, t, 16 * h * w])?;
        // masks = hyper_in @ up^T.
        let dhyper_in = be.matmul(&dm, &c.up, false)?;
        let dmt = be.permute(&dm, &[0, 2, 1])?;
        let dup = be.matmul(&dmt, &c.hyper_in, false)?;
        // Token gradients: row 0 from the IoU head, rows 1..=T from the hypernetworks.
        let zero_row = be.upload(&crate::Tensor::zeros(&[b, 1, cch]))?;
        let mut rows: Vec<B::Tensor> = Vec::with_capacity(1 + t + c.sparse_len);
        rows.push(match diou {
            Some(di) => {
                let di = be.reshape(di, &[b, 1, t])?;
                dx(self.iou_head.backward(be, &c.iou, &di, grads, true)?)?
            }
            None => zero_row.clone(),
        });
        for i in 0..t {
            let g = be.narrow(&dhyper_in, 1, i, 1)?;
            rows.push(dx(self.hyper_mlps[i].backward(
                be,
                &c.hyper[i],
                &g,
                grads,
                true,
            )?)?);
        }
        if c.sparse_len > 0 {
            rows.push(be.upload(&crate::Tensor::zeros(&[b, c.sparse_len, cch]))?);
        }
        let dhs = be.concat(&rows.iter().collect::<Vec<_>>(), 1)?;
        // Upscaling path back to the image tokens.
        let cu = be.dims(&c.up)[2];
        let g = be.reshape(&dup, &[b, 4 * h, 4 * w, cu])?;
        let g = be.activate_backward(&c.u2, &g, Act::Gelu)?;
        let g = self.up2.backward(be, &c.u1g, &g, grads)?;
        let g = be.activate_backward(&c.u1n, &g, Act::Gelu)?;
        let g = self.up_norm.backward(be, &c.u1, &g, grads)?;
        let g = self.up1.backward(be, &c.src, &g, grads)?;
        let mut dkeys = be.reshape(&g, &[b, h * w, cch])?;
        // hs = norm_final(queries + final_attn(queries + tokens, keys + pe, keys)).
        let dhs_in = self.norm_final.backward(be, &c.hs_in, &dhs, grads)?;
        let (dqp, dkp, dv) = self
            .final_attn
            .backward(be, &c.final_attn, &dhs_in, grads)?;
        let mut dq = add(be, &dhs_in, &dqp)?;
        let mut dtokens = dqp;
        dkeys = add(be, &add(be, &dkeys, &dkp)?, &dv)?;
        for (layer, lc) in self.layers.iter().zip(&c.layers).rev() {
            let (a, k, pe) = layer.backward(be, lc, &dq, &dkeys, grads)?;
            dq = a;
            dkeys = k;
            dtokens = add(be, &dtokens, &pe)?;
        }
        dtokens = add(be, &dtokens, &dq)?;
        if grads.wants(OUTPUT_TOKENS) {
            let d = be.narrow(&dtokens, 1, 0, 1 + t)?;
            let d = be.sum_rows(&d, (1 + t) * cch)?;
            grads.accum(be, OUTPUT_TOKENS, be.reshape(&d, &[1, 1 + t, cch])?)?;
        }
        if need_demb {
            Ok(Some(be.reshape(&dkeys, &[b, h, w, cch])?))
        } else {
            Ok(None)
        }
    }
}

/// The in-model name of the concatenated IoU + mask tokens `[1, 1 + T, C]`; checkpoints store
/// them as `mask_decoder.iou_token.weight` `[1, C]` and `mask_decoder.mask_tokens.weight`
/// `[T, C]`.
pub const OUTPUT_TOKENS: &str = "mask_decoder.output_tokens";
