//! Med-SA's bottleneck adapter: `fc2(gelu(fc1 x))`, optionally plus `x`.
//!
//! `D_fc1: D -> D/4` and `D_fc2: D/4 -> D`, both with bias (keys `{prefix}.D_fc1`, `{prefix}.D_fc2`).
//! Space adapters keep the skip; MLP and depth adapters drop it (SPEC sections 2 and 3).

use crate::backend::{Act, Backend};
use crate::error::Result;
use crate::nn::{dx, Grads, Linear};
use crate::weights::WeightStore;

/// A bottleneck adapter.
pub struct Adapter<B: Backend> {
    /// `D -> hidden`.
    pub fc1: Linear<B>,
    /// `hidden -> D`.
    pub fc2: Linear<B>,
    /// Whether the input is added back (`x + fc2(gelu(fc1 x))`).
    pub skip: bool,
    /// Activation between the layers (exact GELU in the encoder; none in HyP-Adpt's fallback).
    pub act: Act,
}

impl<B: Backend> Adapter<B> {
    /// Loads `{prefix}.D_fc1` / `{prefix}.D_fc2` with the given widths.
    pub fn load(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        dim: usize,
        hidden: usize,
        skip: bool,
    ) -> Result<Self> {
        Ok(Adapter {
            fc1: Linear::load(be, ws, &format!("{prefix}.D_fc1"), dim, hidden, true)?,
            fc2: Linear::load(be, ws, &format!("{prefix}.D_fc2"), hidden, dim, true)?,
            skip,
            act: Act::Gelu,
        })
    }

    /// Loads the adapter if `{prefix}.D_fc1.weight` exists, taking its hidden width from the file.
    pub fn load_opt(
        be: &B,
        ws: &mut WeightStore,
        prefix: &str,
        dim: usize,
        skip: bool,
    ) -> Result<Option<Self>> {
        let key = format!("{prefix}.D_fc1.weight");
        if !ws.has(&key) {
            return Ok(None);
        }
        let hidden = ws.shape(&key)?[0];
        Self::load(be, ws, prefix, dim, hidden, skip).map(Some)
    }

    /// Applies the adapter to `x` `[.., D]`.
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.fc1.forward(be, x, self.act)?;
        if self.skip {
            // The skip rides in fc2's GEMM epilogue on backends that fuse it.
            be.linear_residual(&h, &self.fc2.weight, self.fc2.bias.as_ref(), x, 1.0)
        } else {
            self.fc2.forward(be, &h, Act::None)
        }
    }

    /// `r + alpha * adapter(x)` for an adapter without skip (Med-SA's scaled MLP adapter), the
    /// residual add fused into fc2.
    pub fn forward_residual(
        &self,
        be: &B,
        x: &B::Tensor,
        r: &B::Tensor,
        alpha: f32,
    ) -> Result<B::Tensor> {
        if self.skip {
            let y = self.forward(be, x)?;
            return be.add_scaled(r, 1.0, &y, alpha);
        }
        let h = self.fc1.forward(be, x, self.act)?;
        be.linear_residual(&h, &self.fc2.weight, self.fc2.bias.as_ref(), r, alpha)
    }
}

/// What [`Adapter::forward_t`] keeps for the backward pass.
pub struct AdapterCache<T> {
    x: T,
    h: T,
    pre: Option<T>,
}

impl<B: Backend> Adapter<B> {
    /// Appends the adapter's parameters.
    pub fn params<'a>(&'a mut self, out: &mut crate::nn::ParamList<'a, B>) {
        self.fc1.params(out);
        self.fc2.params(out);
    }

    /// Forward keeping what backward needs.
    pub fn forward_t(&self, be: &B, x: &B::Tensor) -> Result<(B::Tensor, AdapterCache<B::Tensor>)> {
        let (h, pre) = self.fc1.forward_t(be, x, self.act)?;
        let y = self.fc2.forward(be, &h, Act::None)?;
        let y = if self.skip {
            be.add_scaled(x, 1.0, &y, 1.0)?
        } else {
            y
        };
        let c = AdapterCache {
            x: x.clone(),
            h,
            pre,
        };
        Ok((y, c))
    }

    /// `dx` given the output gradient (the skip path included).
    pub fn backward(
        &self,
        be: &B,
        c: &AdapterCache<B::Tensor>,
        dy: &B::Tensor,
        grads: &mut Grads<B>,
    ) -> Result<B::Tensor> {
        let dh = dx(self.fc2.backward_pre(be, &c.h, dy, grads, true)?)?;
        let dx =
            dx(self
                .fc1
                .backward(be, &c.x, &c.h, c.pre.as_ref(), self.act, &dh, grads, true)?)?;
        if self.skip {
            be.add_scaled(&dx, 1.0, dy, 1.0)
        } else {
            Ok(dx)
        }
    }
}
