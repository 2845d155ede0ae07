//! Convolutions, channels-last.
//!
//! * `conv2d`: `x` `[B, H, W, Cin]`, `w` `[Cout, Cin, kh, kw]`, stride `s`, zero pad `p`:
//!   `y[b, oy, ox, o] = bias[o] + sum_{ky,kx,c} x[b, oy*s+ky-p, ox*s+kx-p, c] w[o, c, ky, kx]`,
//!   `Ho = (H + 2p - kh) / s + 1`. Lowered to one GEMM: im2col gathers each output pixel's
//!   receptive field as a row ordered `(ky, kx, c)` (so each `(ky, kx)` tap is a contiguous copy of
//!   `Cin` channels out of NHWC), and the weight is reordered once to `[Cout, kh, kw, Cin]` to
//!   match. A 1x1 stride-1 unpadded conv skips im2col: NHWC input already is that matrix.
//! * `conv_transpose2x2` (kernel 2, stride 2): `y[b, 2i+di, 2j+dj, o] = bias[o] +
//!   sum_c x[b,i,j,c] w[c,o,di,dj]`. With the weight reordered to `[Cin, di, dj, Cout]` this is one
//!   GEMM `[B*H*W, Cin] x [Cin, 4*Cout]` followed by a scatter of each `Cout` run to its output
//!   pixel (adding the bias on the way).

use crate::backend::Act;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::bf16::Prec;
use super::linalg::{linear, par_for, product, Mat};
use super::{for_chunks, make};

/// 2D convolution via im2col + one GEMM.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
    prec: Prec,
) -> Result<Tensor> {
    let (sx, sw) = (x.shape(), w.shape());
    if sx.len() != 4 || sw.len() != 4 || sw[1] != sx[3] || stride == 0 {
        return Err(Error::shape(
            "conv2d",
            format!("x {sx:?} (NHWC) with w {sw:?} ([Cout, Cin, kh, kw]), stride {stride}"),
        ));
    }
    let (bn, h, wd, cin) = (sx[0], sx[1], sx[2], sx[3]);
    let (cout, kh, kw) = (sw[0], sw[2], sw[3]);
    if h + 2 * pad < kh || wd + 2 * pad < kw {
        return Err(Error::shape(
            "conv2d",
            format!("kernel {kh}x{kw} larger than padded input {h}x{wd} (+{pad})"),
        ));
    }
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let kk = kh * kw * cin;
    // [Cout, Cin, kh, kw] -> [Cout, kh, kw, Cin].
    let wsrc = w.data();
    let mut wr = super::zeroed(cout * kk);
    for o in 0..cout {
        for c in 0..cin {
            for t in 0..kh * kw {
                wr[o * kk + t * cin + c] = wsrc[(o * cin + c) * kh * kw + t];
            }
        }
    }
    let wr = make(wr, &[cout, kk])?;
    let m = bn * ho * wo;
    let col = if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
        x.reshape(&[m, cin])?
    } else {
        let mut col = super::zeroed(m * kk);
        let src = x.data();
        for_chunks(&mut col, kk, |row, dst| {
            let (bi, oy, ox) = (row / (ho * wo), (row / wo) % ho, row % wo);
            for ky in 0..kh {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= h as isize {
                    continue; // padding rows stay zero
                }
                let base = (bi * h + iy as usize) * wd;
                // Consecutive taps read consecutive input pixels (whatever the stride), so the
                // in-range taps of this kernel row are one contiguous run of Cin-channel pixels.
                let ix0 = (ox * stride) as isize - pad as isize;
                let lo = (-ix0).max(0) as usize;
                let hi = ((wd as isize - ix0).min(kw as isize)).max(0) as usize;
                if lo < hi {
                    let at = (base + (ix0 + lo as isize) as usize) * cin;
                    let d0 = (ky * kw + lo) * cin;
                    dst[d0..d0 + (hi - lo) * cin].copy_from_slice(&src[at..at + (hi - lo) * cin]);
                }
            }
        });
        make(col, &[m, kk])?
    };
    let y = linear(&col, &wr, b, Act::None, prec)
        .map_err(|e| Error::shape("conv2d", format!("bias: {e}")))?;
    y.reshape(&[bn, ho, wo, cout])
}

/// Kernel-2 stride-2 transposed convolution via one GEMM and a scatter.
pub(crate) fn conv_transpose2x2(x: &Tensor, w: &Tensor, b: &Tensor, prec: Prec) -> Result<Tensor> {
    let (sx, sw) = (x.shape(), w.shape());
    if sx.len() != 4 || sw.len() != 4 || sw[0] != sx[3] || sw[2] != 2 || sw[3] != 2 {
        return Err(Error::shape(
            "conv_transpose2x2",
            format!("x {sx:?} (NHWC) with w {sw:?} ([Cin, Cout, 2, 2])"),
        ));
    }
    let (bn, h, wd, cin) = (sx[0], sx[1], sx[2], sx[3]);
    let cout = sw[1];
    if b.shape() != [cout] {
        return Err(Error::shape(
            "conv_transpose2x2",
            format!("bias {:?}, want [{cout}]", b.shape()),
        ));
    }
    let n4 = 4 * cout;
    // [Cin, Cout, di, dj] -> [Cin, di, dj, Cout]: each (di, dj) tap becomes a contiguous Cout run.
    let wsrc = w.data();
    let mut wr = super::zeroed(cin * n4);
    for c in 0..cin {
        for o in 0..cout {
            for t in 0..4 {
                wr[c * n4 + t * cout + o] = wsrc[(c * cout + o) * 4 + t];
            }
        }
    }
    let m = bn * h * wd;
    let mut y = super::zeroed(m * n4);
    // SAFETY: x is m x cin, wr is cin x n4, y is m x n4, all row-major and live.
    unsafe {
        product(
            prec,
            m,
            n4,
            cin,
            y.as_mut_ptr(),
            n4,
            false,
            Mat {
                ptr: x.data().as_ptr(),
                rs: cin as isize,
                cs: 1,
            },
            Mat {
                ptr: wr.as_ptr(),
                rs: n4 as isize,
                cs: 1,
            },
            1.0,
            par_for(m, n4, cin),
        );
    }
    let (ho, wo) = (2 * h, 2 * wd);
    let mut out = super::zeroed(bn * ho * wo * cout);
    let bias = b.data();
    for_chunks(&mut out, wo * cout, |row, dst| {
        let (bi, oy) = (row / ho, row % ho);
        let (i, di) = (oy / 2, oy % 2);
        for (ox, px) in dst.chunks_exact_mut(cout.max(1)).enumerate() {
            let (j, dj) = (ox / 2, ox % 2);
            let at = ((bi * h + i) * wd + j) * n4 + (di * 2 + dj) * cout;
            for ((o, &v), &bb) in px.iter_mut().zip(&y[at..at + cout]).zip(bias) {
                *o = v + bb;
            }
        }
    });
    make(out, &[bn, ho, wo, cout])
}
