//! The fused elementwise-and-GEMM ops: a linear layer with its residual add in the GEMM
//! (cuBLASLt's C operand) and a residual add followed by LayerNorm in one kernel
//! (`kernels/layernorm.cu`).

use super::{shape_err, Arg, Cuda, CudaTensor};
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

    /// Whether rows of `c` elements in `ts` suit the warp-per-row LayerNorm kernels
    /// (`kernels/layernorm.cu`): the row fits a warp's registers (at most 2048 elements, a
    /// whole number of 16-byte vectors) and every buffer is 16-byte aligned (the pool's blocks
    /// are). Otherwise the block-per-row kernels run.
    pub(super) fn layernorm_warp_fits(&self, c: usize, ts: &[&CudaTensor]) -> bool {
        let vec = 16 / self.precision.size();
        c.is_multiple_of(vec) && c <= 2048 && ts.iter().all(|t| t.ptr().is_multiple_of(16))
    }

    /// [`Backend::add_layer_norm`](crate::backend::Backend::add_layer_norm) on this device.
    pub(super) fn add_layer_norm_impl(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        beta: f32,
        g: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let c = *a.shape.last().unwrap_or(&0);
        if a.shape != b.shape || g.shape != [c] || bias.shape != [c] {
            return Err(shape_err(
                "add_layer_norm",
                format!(
                    "a {:?}, b {:?}, g {:?}, bias {:?}",
                    a.shape, b.shape, g.shape, bias.shape
                ),
            ));
        }
        let s = self.empty("add_layer_norm", &a.shape)?;
        let y = self.empty("add_layer_norm", &a.shape)?;
        let rows = a.numel() / c.max(1);
        if rows > 0 && c > 0 {
            let warp = self.layernorm_warp_fits(c, &[a, b, &s, g, bias, &y]);
            let (kernel, grid) = if warp {
                ("add_layernorm_warp", rows.div_ceil(4))
            } else {
                ("add_layernorm", rows)
            };
            self.launch(
                kernel,
                (grid as u32, 1, 1),
                (128, 1, 1),
                0,
                &[
                    Arg::P(a.ptr()),
                    Arg::P(b.ptr()),
                    Arg::F(beta),
                    Arg::P(s.ptr()),
                    Arg::P(g.ptr()),
                    Arg::P(bias.ptr()),
                    Arg::P(y.ptr()),
                    Arg::I(rows as i32),
                    Arg::I(c as i32),
                    Arg::F(eps),
                ],
            )?;
        }
        Ok((s, y))
    }
}
