//! `F.interpolate(..., align_corners=False)` for `[B, C, H, W]`, bilinear and bicubic.
//!
//! Per axis, output index `o` maps to the source coordinate `src = (o + 0.5) * in / out - 0.5`
//! (computed in f32 like PyTorch).
//! * Bilinear: `src` clamped below at 0; taps `i0 = floor(src)`, `i1 = min(i0 + 1, in - 1)` with
//!   weights `1 - l`, `l` where `l = src - i0`.
//! * Bicubic (Keys, A = -0.75): no clamp on `src`; `i = floor(src)`, `t = src - i`; taps
//!   `i-1..=i+2` clamped to `[0, in-1]` with weights `k(t+1), k(t), k(1-t), k(2-t)` where
//!   `k(x) = ((A+2)x - (A+3))x^2 + 1` on `[0, 1]` and `A x^3 - 5A x^2 + 8A x - 4A` on `(1, 2)`.
//!
//! Both kernels are separable, so the 2-D interpolation is a horizontal pass over every input row
//! followed by a vertical pass, the same order PyTorch evaluates bicubic in.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{for_chunks, make};

/// Interpolation kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Bilinear,
    Bicubic,
}

const A: f32 = -0.75;

/// Source taps and weights (4 slots; bilinear uses the first 2) for each output index.
fn taps(inp: usize, out: usize, mode: Mode) -> Vec<([usize; 4], [f32; 4])> {
    let scale = inp as f32 / out as f32;
    let last = inp as isize - 1;
    (0..out)
        .map(|o| {
            let src = scale * (o as f32 + 0.5) - 0.5;
            match mode {
                Mode::Bilinear => {
                    let src = src.max(0.0);
                    let i0 = src.floor();
                    let l = src - i0;
                    let i0 = (i0 as usize).min(inp - 1);
                    let i1 = (i0 + 1).min(inp - 1);
                    ([i0, i1, 0, 0], [1.0 - l, l, 0.0, 0.0])
                }
                Mode::Bicubic => {
                    let fi = src.floor();
                    let t = src - fi;
                    let i = fi as isize;
                    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
                    let idx = |k: isize| (i + k).clamp(0, last) as usize;
                    (
                        [idx(-1), idx(0), idx(1), idx(2)],
                        [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)],
                    )
                }
            }
        })
        .collect()
}

/// Resizes `x` `[B, C, H, W]` to `[B, C, size.0, size.1]`.
pub(crate) fn resize(x: &Tensor, size: (usize, usize), mode: Mode) -> Result<Tensor> {
    let s = x.shape();
    let (oh, ow) = size;
    if s.len() != 4 || s[2] == 0 || s[3] == 0 || oh == 0 || ow == 0 {
        return Err(Error::shape("resize", format!("{s:?} (NCHW) to {oh}x{ow}")));
    }
    let (planes, h, w) = (s[0] * s[1], s[2], s[3]);
    let nt = if mode == Mode::Bilinear { 2 } else { 4 };
    let tx = taps(w, ow, mode);
    let ty = taps(h, oh, mode);
    let src = x.data();
    // Horizontal pass: every input row -> ow columns.
    let mut tmp = super::zeroed(planes * h * ow);
    for_chunks(&mut tmp, ow, |row, dst| {
        let r = &src[row * w..(row + 1) * w];
        for (o, (idx, wt)) in dst.iter_mut().zip(&tx) {
            let mut acc = 0.0;
            for t in 0..nt {
                acc += wt[t] * r[idx[t]];
            }
            *o = acc;
        }
    });
    // Vertical pass: each output row is a weighted sum of nt intermediate rows.
    let mut out = super::zeroed(planes * oh * ow);
    for_chunks(&mut out, ow, |row, dst| {
        let (p, oy) = (row / oh, row % oh);
        let (idx, wt) = &ty[oy];
        let base = p * h * ow;
        let rows: [&[f32]; 4] = std::array::from_fn(|t| {
            let at = base + idx[t] * ow;
            &tmp[at..at + ow]
        });
        if nt == 2 {
            for (c, o) in dst.iter_mut().enumerate() {
                *o = wt[0] * rows[0][c] + wt[1] * rows[1][c];
            }
        } else {
            for (c, o) in dst.iter_mut().enumerate() {
                *o = wt[0] * rows[0][c]
                    + wt[1] * rows[1][c]
                    + wt[2] * rows[2][c]
                    + wt[3] * rows[3][c];
            }
        }
    });
    make(out, &[s[0], s[1], oh, ow])
}
