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
use crate::nn::{LayerNorm, Linear};
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
