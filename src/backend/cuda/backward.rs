//! The CUDA backward ops: launchers of `kernels/backward.cu` (activation, column sums,
//! LayerNorm, col2im) and the cuBLASLt GEMMs of the linear and conv gradients; attention's
//! are in `attention_backward.rs`.
//!
//! Each launcher checks shapes, allocates its outputs (and f32 scratch) from the pool and
//! launches with the geometry documented in the kernel file's header. Scratch buffers are
//! released to the pool when they go out of scope: every kernel runs on the backend's one
//! stream, so a later op reusing the block is ordered after the kernels that read it.

use std::sync::Arc;

use super::conv::ConvGeom;
use super::gemm::GemmSpec;
use super::layernorm::{LnBwdLaunch, Rows};
use super::{dev, shape_err, Arg, Cuda, CudaTensor, DevBuf};
use crate::backend::Act;
use crate::error::Result;

/// Most partial rows a column sum reduces in its second pass.
const COLSUM_MAX_PARTS: usize = 256;
/// Most CTAs (= partial rows of dg, db) of `layernorm_bwd`.
const LN_BWD_MAX_BLOCKS: usize = 1024;

/// An f32 device scratch buffer (partial sums, softmax statistics), back to the pool on drop.
pub(super) struct Scratch(DevBuf);

impl Scratch {
    pub(super) fn ptr(&self) -> u64 {
        self.0.ptr
    }
}

impl Cuda {
    /// `n` f32 of uninitialised scratch.
    pub(super) fn scratch(&self, op: &str, n: usize) -> Result<Scratch> {
        let (ptr, size) = self.pool.alloc(op, n.max(1) * 4)?;
        Ok(Scratch(DevBuf {
            ptr,
            size,
            pool: self.pool.clone(),
        }))
    }

    /// Sets `bytes` bytes at `ptr` to zero, in stream order.
    pub(super) fn memset0(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match &self.device {
            super::Device::Gpu(g) => {
                g.ctx.bind_to_thread().map_err(dev)?;
                unsafe {
                    cudarc::driver::result::memset_d8_async(ptr, 0, bytes, g.stream.cu_stream())
                }
                .map_err(dev)
            }
            // SAFETY: ptr addresses a live pool block of at least `bytes` bytes.
            super::Device::Emu(_) => {
                unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
                Ok(())
            }
        }
    }

    /// A zero-filled tensor.
    pub(super) fn zeros_dev(&self, op: &str, shape: &[usize]) -> Result<CudaTensor> {
        let y = self.empty(op, shape)?;
        self.memset0(y.ptr(), y.numel() * self.precision.size())?;
        Ok(y)
    }

    /// `y[c] = sum_p part[p, c]` (f32 partials `[nparts, cols]`) in fixed order, as storage.
    pub(super) fn colsum_fin(&self, part: u64, nparts: usize, cols: usize) -> Result<CudaTensor> {
        let y = self.empty("colsum_fin", &[cols])?;
        if cols > 0 {
            self.launch(
                "colsum_fin",
                (cols.div_ceil(32) as u32, 1, 1),
                (32, 8, 1),
                0,
                &[
                    Arg::P(part),
                    Arg::P(y.ptr()),
                    Arg::I(nparts as i32),
                    Arg::I(cols as i32),
                ],
            )?;
        }
        Ok(y)
    }

    /// Column sums of `x` viewed as `[rows, cols]`: partial sums over row chunks, then the
    /// chunks in order.
    pub(super) fn sum_rows_impl(&self, x: &CudaTensor, cols: usize) -> Result<CudaTensor> {
        let n = x.numel();
        if cols == 0 || !n.is_multiple_of(cols) || cols > i32::MAX as usize {
            return Err(shape_err(
                "sum_rows",
                format!("{n} elements are not rows of {cols}"),
            ));
        }
        let rows = n / cols;
        if rows > i32::MAX as usize {
            return Err(shape_err("sum_rows", format!("{rows} rows")));
        }
        // ~64 rows per partial, at most COLSUM_MAX_PARTS partials.
        let nparts = rows.div_ceil(64).clamp(1, COLSUM_MAX_PARTS);
        let chunk = rows.div_ceil(nparts).max(1);
        let nparts = rows.div_ceil(chunk);
        let part = self.scratch("sum_rows", nparts * cols)?;
        if nparts > 0 {
            self.launch(
                "colsum_part",
                (cols.div_ceil(32) as u32, nparts as u32, 1),
                (32, 8, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(part.ptr()),
                    Arg::I(rows as i32),
                    Arg::I(cols as i32),
                    Arg::I(chunk as i32),
                ],
            )?;
        }
        self.colsum_fin(part.ptr(), nparts, cols)
    }

    /// `dx = dy * act'(x)`.
    pub(super) fn activate_backward_impl(
        &self,
        x: &CudaTensor,
        dy: &CudaTensor,
        act: Act,
    ) -> Result<CudaTensor> {
        if x.shape != dy.shape {
            return Err(shape_err(
                "activate_backward",
                format!("x {:?} and dy {:?}", x.shape, dy.shape),
            ));
        }
        let code = match act {
            Act::None => 0,
            Act::Gelu => 1,
            Act::Relu => 2,
        };
        let dx = self.empty("activate_backward", &x.shape)?;
        let n = x.numel();
        if n > 0 {
            self.launch(
                "act_bwd",
                Self::grid1d(n),
                (256, 1, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(dy.ptr()),
                    Arg::P(dx.ptr()),
                    Arg::L(n as i64),
                    Arg::I(code),
                ],
            )?;
        }
        Ok(dx)
    }

    /// `dx [rows, k] = dy [rows, n] @ w [n, k]`: column-major `dx^T (k x rows) = w^T dy^T`,
    /// where row-major `w` already is `w^T` column-major (no transposes).
    fn gemm_dx(&self, dy: u64, w: u64, dx: u64, rows: usize, n: usize, k: usize) -> Result<()> {
        let spec = GemmSpec {
            transa: false,
            transb: false,
            m: k as u64,
            n: rows as u64,
            k: n as u64,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            bias: false,
        };
        self.gemm(spec, w, dy, dx, None)
    }

    /// `dw [n, k] = dy^T [n, rows] @ x [rows, k]`: column-major `dw^T (k x n) = x^T dy`, with
    /// row-major `x` read as `x^T` and row-major `dy` (column-major `dy^T`) transposed by
    /// cuBLASLt.
    fn gemm_dw(&self, x: u64, dy: u64, dw: u64, rows: usize, n: usize, k: usize) -> Result<()> {
        let spec = GemmSpec {
            transa: false,
            transb: true,
            m: k as u64,
            n: n as u64,
            k: rows as u64,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            bias: false,
        };
        self.gemm(spec, x, dy, dw, None)
    }

    pub(super) fn linear_backward_input_impl(
        &self,
        dy: &CudaTensor,
        w: &CudaTensor,
    ) -> Result<CudaTensor> {
        let s = &dy.shape;
        let n = *s.last().unwrap_or(&0);
        if s.is_empty() || w.shape.len() != 2 || w.shape[0] != n {
            return Err(shape_err(
                "linear_backward_input",
                format!("dy {s:?} and weight {:?}", w.shape),
            ));
        }
        let k = w.shape[1];
        let rows = dy.numel() / n.max(1);
        let mut out = s[..s.len() - 1].to_vec();
        out.push(k);
        if rows == 0 || k == 0 {
            return self.empty("linear_backward_input", &out);
        }
        if n == 0 {
            return self.zeros_dev("linear_backward_input", &out);
        }
        let dx = self.empty("linear_backward_input", &out)?;
        self.gemm_dx(dy.ptr(), w.ptr(), dx.ptr(), rows, n, k)?;
        Ok(dx)
    }

    pub(super) fn linear_backward_weight_impl(
        &self,
        x: &CudaTensor,
        dy: &CudaTensor,
        bias: bool,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let (k, n) = (
            *x.shape.last().unwrap_or(&0),
            *dy.shape.last().unwrap_or(&0),
        );
        let rows = x.numel() / k.max(1);
        if x.shape.is_empty() || dy.shape.is_empty() || rows * n != dy.numel() {
            return Err(shape_err(
                "linear_backward_weight",
                format!("x {:?} and dy {:?}", x.shape, dy.shape),
            ));
        }
        let dw = if rows == 0 {
            self.zeros_dev("linear_backward_weight", &[n, k])?
        } else {
            let dw = self.empty("linear_backward_weight", &[n, k])?;
            if n * k > 0 {
                self.gemm_dw(x.ptr(), dy.ptr(), dw.ptr(), rows, n, k)?;
            }
            dw
        };
        let db = if bias {
            Some(if n == 0 {
                self.empty("linear_backward_weight", &[0])?
            } else {
                self.sum_rows_impl(dy, n)?
            })
        } else {
            None
        };
        Ok((dw, db))
    }

    pub(super) fn layer_norm_backward_impl(
        &self,
        x: &CudaTensor,
        g: &CudaTensor,
        dy: &CudaTensor,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let c = *x.shape.last().unwrap_or(&0);
        if x.shape.is_empty() || g.shape != [c] || dy.shape != x.shape || c > i32::MAX as usize {
            return Err(shape_err(
                "layer_norm_backward",
                format!("x {:?}, g {:?}, dy {:?}", x.shape, g.shape, dy.shape),
            ));
        }
        let rows = x.numel() / c.max(1);
        if rows > i32::MAX as usize {
            return Err(shape_err("layer_norm_backward", format!("{rows} rows")));
        }
        let dx = self.empty("layer_norm_backward", &x.shape)?;
        if rows == 0 || c == 0 {
            return Ok((
                dx,
                self.zeros_dev("layer_norm_backward", &[c])?,
                self.zeros_dev("layer_norm_backward", &[c])?,
            ));
        }
        let nblk = rows.min(LN_BWD_MAX_BLOCKS);
        let pg = self.scratch("layer_norm_backward", nblk * c)?;
        let pb = self.scratch("layer_norm_backward", nblk * c)?;
        let launch = LnBwdLaunch {
            x: x.ptr(),
            g: g.ptr(),
            dy: dy.ptr(),
            dx: dx.ptr(),
            pg: pg.ptr(),
            pb: pb.ptr(),
            rows: Rows { rows, c, eps },
        };
        self.launch(
            "layernorm_bwd",
            (nblk as u32, 1, 1),
            (128, 1, 1),
            0,
            &launch.args(),
        )?;
        let dg = self.colsum_fin(pg.ptr(), nblk, c)?;
        let db = self.colsum_fin(pb.ptr(), nblk, c)?;
        Ok((dx, dg, db))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        dy: &CudaTensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<(Option<CudaTensor>, CudaTensor, Option<CudaTensor>)> {
        let (s, ws) = (&x.shape, &w.shape);
        let bad = || {
            shape_err(
                "conv2d_backward",
                format!(
                    "x {s:?}, w {ws:?}, dy {:?}, stride {stride}, pad {pad}",
                    dy.shape
                ),
            )
        };
        let g = ConvGeom::of(s, ws, stride, pad).ok_or_else(bad)?;
        let co = ws[0];
        if dy.shape != [g.b, g.ho, g.wo, co] {
            return Err(bad());
        }
        let (m, kk) = g.cols();
        // dW [co, kk] = dy^T [co, m] @ cols [m, kk] (cols = im2col(x), the forward's operand).
        let dw = if m == 0 || co * kk == 0 {
            self.zeros_dev("conv2d_backward", ws)?
        } else {
            let cols = self.empty("conv2d_backward", &[m, kk])?;
            self.launch(
                "im2col",
                Self::grid1d(cols.numel()),
                (256, 1, 1),
                0,
                &g.args(x.ptr(), cols.ptr()),
            )?;
            let dw = self.empty("conv2d_backward", ws)?;
            self.gemm_dw(cols.ptr(), dy.ptr(), dw.ptr(), m, co, kk)?;
            dw
        };
        // dx = col2im(dy [m, co] @ W [co, kk]).
        let dx = if !need_dx {
            None
        } else if x.numel() == 0 {
            Some(self.empty("conv2d_backward", s)?)
        } else if m == 0 || co == 0 {
            Some(self.zeros_dev("conv2d_backward", s)?)
        } else {
            let dcols = self.empty("conv2d_backward", &[m, kk])?;
            self.gemm_dx(dy.ptr(), w.ptr(), dcols.ptr(), m, co, kk)?;
            let dx = self.empty("conv2d_backward", s)?;
            self.launch(
                "col2im",
                Self::grid1d(dx.numel()),
                (256, 1, 1),
                0,
                &g.args(dcols.ptr(), dx.ptr()),
            )?;
            Some(dx)
        };
        let db = if !bias {
            None
        } else if co == 0 {
            Some(self.empty("conv2d_backward", &[0])?)
        } else {
            Some(self.sum_rows_impl(dy, co)?)
        };
        Ok((dx, dw, db))
    }

    /// Same buffer, new shape (element counts match by construction).
    pub(super) fn reshape_owned(&self, t: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != t.numel() {
            return Err(shape_err(
                "reshape",
                format!("cannot view {:?} as {shape:?}", t.shape),
            ));
        }
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf: Arc::clone(&t.buf),
        })
    }
}
