//! One two-way attention block of the mask decoder, in both flavours (SPEC section 7):
//! [`DecoderFlavour`] changes only the self-attention step, in forward and backward alike. The
//! block MLP loads from SAM's keys (`mlp.lin1`, `mlp.lin2`) or the reference code's
//! (`mlp.layers.0.0`, `mlp.fc`) and keeps the names it was loaded under, so a trained checkpoint
//! saves back in its own layout.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::medsa::adapter::{Adapter, AdapterCache};
use crate::medsa::hyper_adapter::{HyperAdapter, HyperCache};
use crate::nn::{dx, Grads, LayerNorm, Linear, ParamList};
use crate::sam::config::{DecoderFlavour, SamConfig};
use crate::sam::image_encoder::MLP_ADAPTER_SCALE;
use crate::sam::mask_decoder::{DecAttnCache, DecoderAttention};
use crate::weights::WeightStore;

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
    /// Which self-attention step the block computes.
    pub flavour: DecoderFlavour,
    /// HyP-Adpt on the tokens after token-to-image attention.
    pub hyper_adapter: Option<HyperAdapter<B>>,
    /// Plain adapter parallel to the MLP (no skip, scale 0.5).
    pub mlp_adapter: Option<Adapter<B>>,
    /// Plain adapter with skip on the image tokens after image-to-token attention.
    pub cross_adapter: Option<Adapter<B>>,
}

impl<B: Backend> TwoWayBlock<B> {
    /// Loads `mask_decoder.transformer.layers.{i}` (SAM's or the reference code's MLP keys).
    pub(crate) fn load(be: &B, ws: &mut WeightStore, cfg: &SamConfig, i: usize) -> Result<Self> {
        let c = cfg.prompt_dim;
        let internal = c / cfg.attention_downsample;
        let heads = cfg.decoder_heads;
        let lc = &cfg.decoder_layers[i];
        let p = format!("mask_decoder.transformer.layers.{i}");
        let ln =
            |ws: &mut WeightStore, n: &str| LayerNorm::load(be, ws, &format!("{p}.{n}"), c, 1e-5);
        Ok(TwoWayBlock {
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
                &mlp_key(ws, &p, "mlp.lin1", "mlp.layers.0.0"),
                c,
                cfg.decoder_mlp_dim,
                true,
            )?,
            lin2: Linear::load(
                be,
                ws,
                &mlp_key(ws, &p, "mlp.lin2", "mlp.fc"),
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
            flavour: cfg.decoder_flavour,
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
        })
    }

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
        let (q, k, _) = self.forward_t(be, queries, keys, query_pe, key_pe, sparse)?;
        Ok((q, k))
    }
}

/// The prefix a block MLP layer is stored under: SAM's name, or the reference code's when the
/// checkpoint has that one (errors then name SAM's key).
fn mlp_key(ws: &WeightStore, block: &str, sam: &str, reference: &str) -> String {
    let r = format!("{block}.{reference}");
    if ws.has(&format!("{r}.weight")) {
        r
    } else {
        format!("{block}.{sam}")
    }
}

/// What [`TwoWayBlock::forward_t`] keeps.
pub struct TwoWayCache<T> {
    self_attn: DecAttnCache<T>,
    q: T,
    t2i: DecAttnCache<T>,
    q3: T,
    hyper: Option<HyperCache<T>>,
    q_n2: T,
    h1: T,
    mlp_adapter: Option<AdapterCache<T>>,
    q4: T,
    i2t: DecAttnCache<T>,
    k3: T,
    cross: Option<AdapterCache<T>>,
}

/// `a + b`.
pub(crate) fn add<B: Backend>(be: &B, a: &B::Tensor, b: &B::Tensor) -> Result<B::Tensor> {
    be.add_scaled(a, 1.0, b, 1.0)
}

impl<B: Backend> TwoWayBlock<B> {
    /// Appends the parameters.
    pub fn params<'a>(&'a mut self, out: &mut ParamList<'a, B>) {
        self.self_attn.params(out);
        self.norm1.params(out);
        self.cross_t2i.params(out);
        self.norm2.params(out);
        self.lin1.params(out);
        self.lin2.params(out);
        self.norm3.params(out);
        self.norm4.params(out);
        self.cross_i2t.params(out);
        if let Some(h) = &mut self.hyper_adapter {
            h.params(out);
        }
        if let Some(a) = &mut self.mlp_adapter {
            a.params(out);
        }
        if let Some(a) = &mut self.cross_adapter {
            a.params(out);
        }
    }

    /// [`TwoWayBlock::forward`] keeping what backward needs.
    #[allow(clippy::type_complexity)]
    pub fn forward_t(
        &self,
        be: &B,
        queries: &B::Tensor,
        keys: &B::Tensor,
        query_pe: &B::Tensor,
        key_pe: &B::Tensor,
        sparse: &B::Tensor,
    ) -> Result<(B::Tensor, B::Tensor, TwoWayCache<B::Tensor>)> {
        // SPEC section 7: SAM's first block has no residual and its later blocks put the PE on
        // queries and keys only; the reference always has a residual and adds the PE to the
        // token stream itself.
        let (q, self_attn) = match (self.flavour, self.skip_first_layer_pe) {
            (DecoderFlavour::Sam, true) => {
                self.self_attn.forward_t(be, queries, queries, queries)?
            }
            (DecoderFlavour::Sam, false) => {
                let qp = add(be, queries, query_pe)?;
                let (a, c) = self.self_attn.forward_t(be, &qp, &qp, queries)?;
                (add(be, queries, &a)?, c)
            }
            (DecoderFlavour::Medsa, true) => {
                let (a, c) = self.self_attn.forward_t(be, queries, queries, queries)?;
                (add(be, queries, &a)?, c)
            }
            (DecoderFlavour::Medsa, false) => {
                let x = add(be, queries, query_pe)?;
                let (a, c) = self.self_attn.forward_t(be, &x, &x, &x)?;
                (add(be, &x, &a)?, c)
            }
        };
        let q_n1 = self.norm1.forward(be, &q)?;
        let qp = add(be, &q_n1, query_pe)?;
        let kp = add(be, keys, key_pe)?;
        let (a, t2i) = self.cross_t2i.forward_t(be, &qp, &kp, keys)?;
        let mut q3 = add(be, &q_n1, &a)?;
        let mut hyper = None;
        if let Some(h) = &self.hyper_adapter {
            let (y, c) = h.forward_t(be, &q3, sparse)?;
            hyper = Some(c);
            q3 = y;
        }
        let q_n2 = self.norm2.forward(be, &q3)?;
        let h1 = self.lin1.forward(be, &q_n2, Act::Relu)?;
        let m = self.lin2.forward(be, &h1, Act::None)?;
        let mut q4 = add(be, &q_n2, &m)?;
        let mut mlp_adapter = None;
        if let Some(ma) = &self.mlp_adapter {
            let (y, c) = ma.forward_t(be, &q_n2)?;
            q4 = be.add_scaled(&q4, 1.0, &y, MLP_ADAPTER_SCALE)?;
            mlp_adapter = Some(c);
        }
        let q_n3 = self.norm3.forward(be, &q4)?;
        let qp = add(be, &q_n3, query_pe)?;
        let (a, i2t) = self.cross_i2t.forward_t(be, &kp, &qp, &q_n3)?;
        let mut k3 = add(be, keys, &a)?;
        let mut cross = None;
        if let Some(ca) = &self.cross_adapter {
            let (y, c) = ca.forward_t(be, &k3)?;
            cross = Some(c);
            k3 = y;
        }
        let k_n4 = self.norm4.forward(be, &k3)?;
        let c = TwoWayCache {
            self_attn,
            q,
            t2i,
            q3,
            hyper,
            q_n2,
            h1,
            mlp_adapter,
            q4,
            i2t,
            k3,
            cross,
        };
        Ok((q_n3, k_n4, c))
    }

    /// Given the gradients of the block's outputs `(queries, keys)`, returns the gradients of
    /// its inputs `(queries, keys, query_pe)` (the key PE is a constant).
    pub fn backward(
        &self,
        be: &B,
        c: &TwoWayCache<B::Tensor>,
        dq_out: &B::Tensor,
        dk_out: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<(B::Tensor, B::Tensor, B::Tensor)> {
        // Image tokens: k_n4 = norm4(adapter(keys + i2t(kp, qp, q_n3))).
        let mut dk3 = self.norm4.backward(be, &c.k3, dk_out, grads)?;
        if let (Some(ca), Some(cc)) = (&self.cross_adapter, &c.cross) {
            dk3 = ca.backward(be, cc, &dk3, grads)?;
        }
        let (dkp, dqp, dv) = self.cross_i2t.backward(be, &c.i2t, &dk3, grads)?;
        let mut dkeys = add(be, &dk3, &dkp)?;
        let mut dpe = dqp.clone();
        let dq_n3 = add(be, &add(be, dq_out, &dqp)?, &dv)?;
        // Tokens: q_n3 = norm3(q_n2 + mlp(q_n2) + 0.5 adapter(q_n2)).
        let dq4 = self.norm3.backward(be, &c.q4, &dq_n3, grads)?;
        let dh1 = dx(self.lin2.backward_pre(be, &c.h1, &dq4, grads, true)?)?;
        let dm = dx(self
            .lin1
            .backward(be, &c.q_n2, &c.h1, None, Act::Relu, &dh1, grads, true)?)?;
        let mut dq_n2 = add(be, &dq4, &dm)?;
        if let (Some(ma), Some(mc)) = (&self.mlp_adapter, &c.mlp_adapter) {
            let g = be.add_scaled(&dq4, MLP_ADAPTER_SCALE, &dq4, 0.0)?;
            dq_n2 = add(be, &dq_n2, &ma.backward(be, mc, &g, grads)?)?;
        }
        let mut dq3 = self.norm2.backward(be, &c.q3, &dq_n2, grads)?;
        if let (Some(h), Some(hc)) = (&self.hyper_adapter, &c.hyper) {
            dq3 = h.backward(be, hc, &dq3, grads)?;
        }
        // q3 = q_n1 + t2i(q_n1 + pe, keys + key_pe, keys).
        let (dqp, dkp, dv) = self.cross_t2i.backward(be, &c.t2i, &dq3, grads)?;
        let dq_n1 = add(be, &dq3, &dqp)?;
        dpe = add(be, &dpe, &dqp)?;
        dkeys = add(be, &add(be, &dkeys, &dkp)?, &dv)?;
        let dq = self.norm1.backward(be, &c.q, &dq_n1, grads)?;
        let (a, b, v) = self.self_attn.backward(be, &c.self_attn, &dq, grads)?;
        let dqueries = match (self.flavour, self.skip_first_layer_pe) {
            (DecoderFlavour::Sam, true) => add(be, &add(be, &a, &b)?, &v)?,
            (DecoderFlavour::Sam, false) => {
                let dqk = add(be, &a, &b)?;
                dpe = add(be, &dpe, &dqk)?;
                add(be, &add(be, &dq, &dqk)?, &v)?
            }
            (DecoderFlavour::Medsa, true) => add(be, &add(be, &add(be, &dq, &a)?, &b)?, &v)?,
            (DecoderFlavour::Medsa, false) => {
                // x = queries + pe feeds q, k, v and the residual.
                let dx = add(be, &add(be, &add(be, &dq, &a)?, &b)?, &v)?;
                dpe = add(be, &dpe, &dx)?;
                dx
            }
        };
        Ok((dqueries, dkeys, dpe))
    }
}
