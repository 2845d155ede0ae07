//! LayerNorm over the last dimension (also channels-last LayerNorm2d):
//! `y = (x - mean) / sqrt(var + eps) * g + b` with the biased variance
//! `var = mean((x - mean)^2)`, computed in two passes: the one-pass `E[x^2] - E[x]^2` cancels
//! catastrophically when |mean| >> std.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{for_chunks, make};

/// Sum with 16 independent accumulators so the reduction vectorises.
#[inline(always)]
fn sum_by(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    let mut s: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for a in acc {
        s += a;
    }
    s
}

/// LayerNorm of each row of `x` (length `C`) with gain `g` `[C]` and bias `b` `[C]`.
pub(crate) fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let s = x.shape();
    let c = *s
        .last()
        .ok_or_else(|| Error::shape("layer_norm", "scalar input"))?;
    if g.shape() != [c] || b.shape() != [c] {
        return Err(Error::shape(
            "layer_norm",
            format!("x {s:?} with g {:?} b {:?}", g.shape(), b.shape()),
        ));
    }
    let mut out = super::zeroed(x.numel());
    let (xd, gd, bd) = (x.data(), g.data(), b.data());
    for_chunks(&mut out, c, |r, dst| {
        let row = &xd[r * c..(r + 1) * c];
        let mean = sum_by(row, |v| v) / c as f32;
        let var = sum_by(row, |v| (v - mean) * (v - mean)) / c as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((y, &v), &gg), &bb) in dst.iter_mut().zip(row).zip(gd).zip(bd) {
            *y = (v - mean) * inv * gg + bb;
        }
    });
    make(out, s)
}
