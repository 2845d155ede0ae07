//! HyP-Adpt: a prompt-conditioned adapter in the mask decoder (SPEC section 4).
//!
//! On tokens `x` `[B, L, d]` with the sample's sparse prompt embeddings `P` `[B, N, d]`:
//! `h = x D_fc1^T + b1` (`[B, L, r]`); for each prompt token i, `W_i = reshape(hyper(P_i), (r,
//! r))` with `hyper = Linear(d,d) -> ReLU -> Linear(d, r*r)`, and `h = relu(LN_r(h @ W_i))`
//! (one LayerNorm shared by all i); `out = x + D_fc2(h)`. Each sample has its own generated
//! layers, so the products are batched small GEMMs. With no prompt tokens it reduces to
//! `x + D_fc2(D_fc1 x)`.

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::nn::{dx, Grads, LayerNorm, Linear};
use crate::weights::WeightStore;

/// The HyP-Adpt module.
pub struct HyperAdapter<B: Backend> {
    /// `d -> r`.
    pub fc1: Linear<B>,
    /// `r -> d`.
    pub fc2: Linear<B>,
    /// `hyper.0`: `d -> d`, ReLU.
    pub hyper0: Linear<B>,
    /// `hyper.2`: `d -> r*r`.
    pub hyper2: Linear<B>,
    /// LayerNorm over `r`.
    pub norm: LayerNorm<B>,
    /// Bottleneck width r.
    pub r: usize,
}

impl<B: Backend> HyperAdapter<B> {
    /// Loads `{prefix}.{D_fc1, D_fc2, hyper.0, hyper.2, norm}`.
    pub fn load(be: &B, ws: &mut WeightStore, prefix: &str, d: usize) -> Result<Self> {
        let r = ws.shape(&format!("{prefix}.D_fc1.weight"))?[0];
        Ok(HyperAdapter {
            fc1: Linear::load(be, ws, &format!("{prefix}.D_fc1"), d, r, true)?,
            fc2: Linear::load(be, ws, &format!("{prefix}.D_fc2"), r, d, true)?,
            hyper0: Linear::load(be, ws, &format!("{prefix}.hyper.0"), d, d, true)?,
            hyper2: Linear::load(be, ws, &format!("{prefix}.hyper.2"), d, r * r, true)?,
            norm: LayerNorm::load(be, ws, &format!("{prefix}.norm"), r, 1e-5)?,
            r,
        })
    }

    /// `x` `[B, L, d]`, `prompts` `[B, N, d]` -> `[B, L, d]`.
    pub fn forward(&self, be: &B, x: &B::Tensor, prompts: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.fc1.forward(be, x, Act::None)?;
        let ps = be.dims(prompts).to_vec();
        let (b, n) = (ps[0], ps[1]);
        if n > 0 {
            let g = self.hyper0.forward(be, prompts, Act::Relu)?;
            let g = self.hyper2.forward(be, &g, Act::None)?; // [B, N, r*r]
            for i in 0..n {
                let wi = be.narrow(&g, 1, i, 1)?;
                let wi = be.reshape(&wi, &[b, self.r, self.r])?;
                h = be.matmul(&h, &wi, false)?;
                h = be.activate(&self.norm.forward(be, &h)?, Act::Relu)?;
            }
        }
        let y = self.fc2.forward(be, &h, Act::None)?;
        be.add_scaled(x, 1.0, &y, 1.0)
    }
}

/// What [`HyperAdapter::forward_t`] keeps for the backward pass.
pub struct HyperCache<T> {
    x: T,
    prompts: T,
    /// `relu(hyper.0(P))` and `hyper.2` of it, when there are prompt tokens.
    g1: Option<T>,
    /// Generated layers `W_i` `[B, r, r]`.
    ws: Vec<T>,
    /// `h_0 .. h_N`.
    hs: Vec<T>,
    /// `h_{i-1} @ W_i` (LayerNorm inputs), i = 1..N.
    ms: Vec<T>,
}

impl<B: Backend> HyperAdapter<B> {
    /// Appends the adapter's parameters.
    pub fn params<'a>(&'a mut self, out: &mut crate::nn::ParamList<'a, B>) {
        self.fc1.params(out);
        self.fc2.params(out);
        self.hyper0.params(out);
        self.hyper2.params(out);
        self.norm.params(out);
    }

    /// Forward keeping what backward needs.
    pub fn forward_t(
        &self,
        be: &B,
        x: &B::Tensor,
        prompts: &B::Tensor,
    ) -> Result<(B::Tensor, HyperCache<B::Tensor>)> {
        let mut h = self.fc1.forward(be, x, Act::None)?;
        let ps = be.dims(prompts).to_vec();
        let (b, n) = (ps[0], ps[1]);
        let mut hs = vec![h.clone()];
        let (mut ws, mut ms, mut g1) = (Vec::new(), Vec::new(), None);
        if n > 0 {
            let g = self.hyper0.forward(be, prompts, Act::Relu)?;
            let gw = self.hyper2.forward(be, &g, Act::None)?;
            g1 = Some(g);
            for i in 0..n {
                let wi = be.narrow(&gw, 1, i, 1)?;
                let wi = be.reshape(&wi, &[b, self.r, self.r])?;
                let m = be.matmul(&h, &wi, false)?;
                h = be.activate(&self.norm.forward(be, &m)?, Act::Relu)?;
                ws.push(wi);
                ms.push(m);
                hs.push(h.clone());
            }
        }
        let y = self.fc2.forward(be, &h, Act::None)?;
        let out = be.add_scaled(x, 1.0, &y, 1.0)?;
        let c = HyperCache {
            x: x.clone(),
            prompts: prompts.clone(),
            g1,
            ws,
            hs,
            ms,
        };
        Ok((out, c))
    }

    /// `dx` given the output gradient; the generated layers pass their gradients on to the
    /// hyper network (the prompts themselves are frozen inputs).
    pub fn backward(
        &self,
        be: &B,
        c: &HyperCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let n = c.ws.len();
        let mut dh = dx(self.fc2.backward_pre(be, &c.hs[n], dy, grads, true)?)?;
        // The generated layers' gradients are only needed when the hyper network trains.
        let hyper0_trained = self.hyper0.trained(grads);
        let hyper_trained = hyper0_trained || self.hyper2.trained(grads);
        let mut dws = Vec::with_capacity(n);
        for i in (0..n).rev() {
            let dn = be.activate_backward(&c.hs[i + 1], &dh, Act::Relu)?;
            let dm = self.norm.backward(be, &c.ms[i], &dn, grads)?;
            // m = h W: dh = dm W^T, dW = h^T dm.
            dh = be.matmul(&dm, &c.ws[i], true)?;
            if hyper_trained {
                let ht = be.permute(&c.hs[i], &[0, 2, 1])?;
                let dw = be.matmul(&ht, &dm, false)?;
                let s = be.dims(&dw).to_vec();
                dws.push(be.reshape(&dw, &[s[0], 1, s[1] * s[2]])?);
            }
        }
        if let (Some(g1), true) = (&c.g1, hyper_trained) {
            dws.reverse();
            let dg = be.concat(&dws.iter().collect::<Vec<_>>(), 1)?;
            if let Some(dg1) = self
                .hyper2
                .backward_pre(be, g1, &dg, grads, hyper0_trained)?
            {
                self.hyper0
                    .backward(be, &c.prompts, g1, None, Act::Relu, &dg1, grads, false)?;
            }
        }
        let dx0 = dx(self.fc1.backward_pre(be, &c.x, &dh, grads, true)?)?;
        be.add_scaled(&dx0, 1.0, dy, 1.0)
    }
}
