//! The CUDA convolutions (patch embedding, the neck's 3x3, mask downscaling, transposed 2x2)
//! and the bilinear / bicubic resizes: shape checks and launches behind `Backend for Cuda`.

use super::gemm::GemmSpec;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::backend::Backend;
use crate::error::Result;

/// A conv2d's geometry as `im2col` (`kernels/elementwise.cu`) and `col2im`
/// (`kernels/backward.cu`) take it: input `[b, h, w, c]` (channels-last), a `kh x kw` kernel
/// with `stride` and zero `pad`, output grid `ho x wo`.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvGeom {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// The geometry of input `x` `[B, H, W, C]` and weight `w` `[Co, C, kh, kw]`; `None` when
    /// they do not fit (rank, channels, a zero stride, a kernel larger than the padded input).
    pub fn of(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Option<Self> {
        if x.len() != 4
            || w.len() != 4
            || w[1] != x[3]
            || stride == 0
            || x[1] + 2 * pad < w[2]
            || x[2] + 2 * pad < w[3]
        {
            return None;
        }
        let (kh, kw) = (w[2], w[3]);
        Some(ConvGeom {
            b: x[0],
            h: x[1],
            w: x[2],
            c: x[3],
            kh,
            kw,
            stride,
            pad,
            ho: (x[1] + 2 * pad - kh) / stride + 1,
            wo: (x[2] + 2 * pad - kw) / stride + 1,
        })
    }

    /// Rows (`b * ho * wo`) and columns (`c * kh * kw`) of the im2col matrix.
    pub fn cols(&self) -> (usize, usize) {
        (self.b * self.ho * self.wo, self.c * self.kh * self.kw)
    }

    /// The arguments of `im2col` (`src` = x, `dst` = cols) or `col2im` (`src` = dcols, `dst`
    /// = dx).
    pub fn args(&self, src: u64, dst: u64) -> Vec<Arg> {
        self.named(("src", src), ("dst", dst))
            .into_iter()
            .map(|(_, a)| a)
            .collect()
    }

    /// [`ConvGeom::args`] with the kernels' parameter names (the two pointers named as given).
    fn named(
        &self,
        src: (&'static str, u64),
        dst: (&'static str, u64),
    ) -> Vec<(&'static str, Arg)> {
        let i = |x: usize| Arg::I(x as i32);
        vec![
            (src.0, Arg::P(src.1)),
            (dst.0, Arg::P(dst.1)),
            ("B", i(self.b)),
            ("H", i(self.h)),
            ("W", i(self.w)),
            ("C", i(self.c)),
            ("kh", i(self.kh)),
            ("kw", i(self.kw)),
            ("stride", i(self.stride)),
            ("pad", i(self.pad)),
            ("Ho", i(self.ho)),
            ("Wo", i(self.wo)),
        ]
    }
}

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
        let g = ConvGeom::of(s, ws, stride, pad).ok_or_else(|| {
            shape_err(
                "conv2d",
                format!("x {s:?}, w {ws:?}, stride {stride}, pad {pad}"),
            )
        })?;
        let (m, kk) = g.cols();
        let cols = self.empty("conv2d", &[m, kk])?;
        if cols.numel() > 0 {
            self.launch(
                "im2col",
                Self::grid1d(cols.numel()),
                (256, 1, 1),
                0,
                &g.args(x.ptr(), cols.ptr()),
            )?;
        }
        let w2 = self.reshape(w, &[ws[0], kk])?;
        let y = self.linear_raw(&cols, &w2, b, m)?;
        self.reshape(&y, &[g.b, g.ho, g.wo, ws[0]])
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

#[cfg(test)]
mod tests {
    use super::super::params::{kernel_params, listed};
    use super::*;

    #[test]
    fn im2col_and_col2im_arguments_follow_the_kernel_parameter_lists() {
        let g = ConvGeom::of(&[2, 9, 7, 3], &[4, 3, 3, 2], 2, 1).unwrap();
        assert_eq!((g.ho, g.wo), (5, 4));
        assert_eq!(
            listed(&g.named(("x", 1), ("cols", 2))),
            kernel_params(
                include_str!("../../../kernels/elementwise.cu"),
                "im2col_##S("
            )
        );
        assert_eq!(
            listed(&g.named(("dcols", 1), ("dx", 2))),
            kernel_params(include_str!("../../../kernels/backward.cu"), "col2im_##S(")
        );
        assert!(ConvGeom::of(&[2, 9, 7, 3], &[4, 2, 3, 2], 2, 1).is_none());
        assert!(ConvGeom::of(&[2, 1, 7, 3], &[4, 3, 4, 2], 1, 1).is_none());
    }
}
