//! The fused linear layer with its residual add in the GEMM (cuBLASLt's C operand); the fused
//! residual add + LayerNorm is in `layernorm.rs`.

use super::{shape_err, Cuda, CudaTensor};
use crate::backend::Backend;
use crate::error::Result;

impl Cuda {
    /// [`Backend::linear_residual`](crate::backend::Backend::linear_residual) on this device.
    pub(super) fn linear_residual_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        r: &CudaTensor,
        alpha: f32,
    ) -> Result<CudaTensor> {
        let k = *x.shape.last().unwrap_or(&0);
        let mut out = x.shape.clone();
        if let Some(l) = out.last_mut() {
            *l = w.shape.first().copied().unwrap_or(0);
        }
        if w.shape.len() != 2
            || w.shape[1] != k
            || b.is_some_and(|b| b.shape != [w.shape[0]])
            || r.shape != out
        {
            return Err(shape_err(
                "linear_residual",
                format!(
                    "x {:?}, w {:?}, b {:?}, residual {:?}",
                    x.shape,
                    w.shape,
                    b.map(|b| b.shape.clone()),
                    r.shape
                ),
            ));
        }
        // cuBLASLt adds the bias after scaling the product: pre-scale it.
        let scaled;
        let b = match b {
            Some(b) if alpha != 1.0 => {
                scaled = self.add_scaled(b, alpha, b, 0.0)?;
                Some(&scaled)
            }
            b => b,
        };
        let m = x.numel() / k.max(1);
        let (y, _) = self.linear_ex(x, w, b, m, false, Some(r), alpha)?;
        Ok(y)
    }
}
