//! The CUDA convolutions (patch embedding, the neck's 3x3, mask downscaling, transposed 2x2)
//! and the bilinear / bicubic resizes: shape checks and launches behind `Backend for Cuda`.

use super::gemm::GemmSpec;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::backend::Backend;
use crate::error::Result;

impl Cuda {
    /// `Backend::conv2d`: im2col (`kernels/elementwise.cu`) + one cuBLASLt GEMM.
    pub(super) fn conv2d_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        stride: usize,
        pad: usize,
    ) -> Result<CudaTensor> {
        let (s, ws) = (&x.shape, &w.shape);
        if s.len() != 4
            || ws.len() != 4
            || ws[1] != s[3]
            || stride == 0
            || s[1] + 2 * pad < ws[2]
            || s[2] + 2 * pad < ws[3]
        {
            return Err(shape_err(
                "conv2d",
                format!("x {s:?}, w {ws:?}, stride {stride}, pad {pad}"),
            ));
        }
        let (bn, h, wd, c) = (s[0], s[1], s[2], s[3]);
        let (co, kh, kw) = (ws[0], ws[2], ws[3]);
        let (ho, wo) = (
            (h + 2 * pad - kh) / stride + 1,
            (wd + 2 * pad - kw) / stride + 1,
        );
        let cols = self.empty("conv2d", &[bn * ho * wo, c * kh * kw])?;
        if cols.numel() > 0 {
            self.launch(
                "im2col",
                Self::grid1d(cols.numel()),
                (256, 1, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(cols.ptr()),
                    Arg::I(bn as i32),
                    Arg::I(h as i32),
                    Arg::I(wd as i32),
                    Arg::I(c as i32),
                    Arg::I(kh as i32),
                    Arg::I(kw as i32),
                    Arg::I(stride as i32),
                    Arg::I(pad as i32),
                    Arg::I(ho as i32),
                    Arg::I(wo as i32),
                ],
            )?;
        }
        let w2 = self.reshape(w, &[co, c * kh * kw])?;
        let y = self.linear_raw(&cols, &w2, b, bn * ho * wo)?;
        self.reshape(&y, &[bn, ho, wo, co])
    }

    /// `Backend::conv_transpose2x2`.
    pub(super) fn conv_transpose2x2_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (s, ws) = (&x.shape, &w.shape);
        if s.len() != 4
            || ws.len() != 4
            || ws[0] != s[3]
            || ws[2] != 2
            || ws[3] != 2
            || b.shape != [ws[1]]
        {
            return Err(shape_err(
                "conv_transpose2x2",
                format!("x {s:?}, w {ws:?}, b {:?}", b.shape),
            ));
        }
        let (bn, h, wd, ci) = (s[0], s[1], s[2], s[3]);
        let co = ws[1];
        let m = bn * h * wd;
        // tmp [m, co*4] = x [m, ci] @ W [ci, co*4]: column-major tmp^T = W^T x^T with W^T read
        // transposed from its row-major [ci, co*4] storage.
        let tmp = self.empty("conv_transpose2x2", &[m, co * 4])?;
        if m > 0 {
            let spec = GemmSpec {
                transa: false,
                transb: false,
                m: (co * 4) as u64,
                n: m as u64,
                k: ci as u64,
                lda: (co * 4) as i64,
                ldb: ci as i64,
                ldc: (co * 4) as i64,
                batch: 1,
                stride_a: 0,
                stride_b: 0,
                stride_c: 0,
                bias: false,
            };
            self.gemm(spec, w.ptr(), x.ptr(), tmp.ptr(), None)?;
        }
        let y = self.empty("conv_transpose2x2", &[bn, 2 * h, 2 * wd, co])?;
        if y.numel() > 0 {
            self.launch(
                "scatter2x2",
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &[
                    Arg::P(tmp.ptr()),
                    Arg::P(b.ptr()),
                    Arg::P(y.ptr()),
                    Arg::I(bn as i32),
                    Arg::I(h as i32),
                    Arg::I(wd as i32),
                    Arg::I(co as i32),
                ],
            )?;
        }
        Ok(y)
    }

    /// Bilinear or bicubic resize (`kernels/resize.cu`), `kernel` naming which.
    pub(super) fn resize(
        &self,
        x: &CudaTensor,
        (h, w): (usize, usize),
        kernel: &'static str,
    ) -> Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 4 || s[2] == 0 || s[3] == 0 || h == 0 || w == 0 {
            return Err(shape_err(kernel, format!("{s:?} -> {h}x{w}")));
        }
        let y = self.empty("resize", &[s[0], s[1], h, w])?;
        let bc = s[0] * s[1];
        if bc > 0 {
            self.launch(
                kernel,
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(y.ptr()),
                    Arg::I(bc as i32),
                    Arg::I(s[2] as i32),
                    Arg::I(s[3] as i32),
                    Arg::I(h as i32),
                    Arg::I(w as i32),
                ],
            )?;
        }
        Ok(y)
    }
}
