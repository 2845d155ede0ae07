//! Depthwise 2D convolution (`groups = channels`), channels-last (TinyViT's MBConv, PatchMerging
//! and `local_conv`).
//!
//! `x` `[B, H, W, C]`, `w` `[C, 1, k, k]`, stride `s`, zero pad `p`:
//! `y[b, oy, ox, c] = bias[c] + sum_{ky,kx} x[b, oy*s+ky-p, ox*s+kx-p, c] w[c, 0, ky, kx]`,
//! `Ho = (H + 2p - k) / s + 1`. The weight is reordered once to `[k*k, C]` so every tap is a
//! contiguous multiply-add over the channel run of one NHWC pixel; rows of the output run in
//! parallel.
//!
//! Backward: `dx[b, iy, ix, c] = sum over taps with oy*s+ky-p = iy, ox*s+kx-p = ix of
//! dy[b, oy, ox, c] w[c, ky, kx]` (gathered per input row, so no two tasks write one element);
//! `dw[c, ky, kx] = sum_{b,oy,ox} dy[b, oy, ox, c] x[b, oy*s+ky-p, ox*s+kx-p, c]`;
//! `db[c] = sum dy[.., c]`.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{for_chunks, make};

struct Geom {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    ho: usize,
    wo: usize,
    s: usize,
    p: usize,
}

fn geom(op: &'static str, x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Geom> {
    let (sx, sw) = (x.shape(), w.shape());
    if sx.len() != 4
        || sw.len() != 4
        || sw[0] != sx[3]
        || sw[1] != 1
        || sw[2] != sw[3]
        || stride == 0
        || sx[1] + 2 * pad < sw[2]
        || sx[2] + 2 * pad < sw[3]
    {
        return Err(Error::shape(
            op,
            format!("x {sx:?} (NHWC) with w {sw:?} ([C, 1, k, k]), stride {stride}, pad {pad}"),
        ));
    }
    let k = sw[2];
    Ok(Geom {
        b: sx[0],
        h: sx[1],
        w: sx[2],
        c: sx[3],
        k,
        ho: (sx[1] + 2 * pad - k) / stride + 1,
        wo: (sx[2] + 2 * pad - k) / stride + 1,
        s: stride,
        p: pad,
    })
}

/// `[C, 1, k, k]` -> `[k*k, C]`.
fn taps(w: &Tensor, c: usize, k: usize) -> Vec<f32> {
    let src = w.data();
    let mut t = vec![0.0f32; k * k * c];
    for ch in 0..c {
        for tap in 0..k * k {
            t[tap * c + ch] = src[ch * k * k + tap];
        }
    }
    t
}

/// The input coordinate of output `o` at tap `t`, if inside the map.
#[inline(always)]
fn src(o: usize, t: usize, g: &Geom, len: usize) -> Option<usize> {
    let i = (o * g.s + t) as isize - g.p as isize;
    (i >= 0 && (i as usize) < len).then_some(i as usize)
}

/// The forward (see the module comment).
pub(crate) fn depthwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let g = geom("depthwise_conv2d", x, w, stride, pad)?;
    let c = g.c;
    if let Some(b) = b {
        if b.shape() != [c] {
            return Err(Error::shape(
                "depthwise_conv2d",
                format!("bias {:?}, want [{c}]", b.shape()),
            ));
        }
    }
    let wt = taps(w, c, g.k);
    let xd = x.data();
    let mut out = super::zeroed(g.b * g.ho * g.wo * c);
    for_chunks(&mut out, g.wo * c, |row, dst| {
        let (bi, oy) = (row / g.ho, row % g.ho);
        for (ox, px) in dst.chunks_exact_mut(c.max(1)).enumerate() {
            match b {
                Some(b) => px.copy_from_slice(b.data()),
                None => px.fill(0.0),
            }
            for ky in 0..g.k {
                let Some(iy) = src(oy, ky, &g, g.h) else {
                    continue;
                };
                for kx in 0..g.k {
                    let Some(ix) = src(ox, kx, &g, g.w) else {
                        continue;
                    };
                    let at = ((bi * g.h + iy) * g.w + ix) * c;
                    let wv = &wt[(ky * g.k + kx) * c..][..c];
                    for ((o, &xv), &wv) in px.iter_mut().zip(&xd[at..at + c]).zip(wv) {
                        *o += xv * wv;
                    }
                }
            }
        }
    });
    make(out, &[g.b, g.ho, g.wo, c])
}

/// The backward: `(dx if need_dx, dw if need_dw, db if bias)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
    need_dx: bool,
    need_dw: bool,
    bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let g = geom("depthwise_conv2d_backward", x, w, stride, pad)?;
    let c = g.c;
    if dy.shape() != [g.b, g.ho, g.wo, c] {
        return Err(Error::shape(
            "depthwise_conv2d_backward",
            format!(
                "dy {:?}, want [{}, {}, {}, {c}]",
                dy.shape(),
                g.b,
                g.ho,
                g.wo
            ),
        ));
    }
    let (xd, gd) = (x.data(), dy.data());
    let dx = if need_dx {
        let wt = taps(w, c, g.k);
        let mut dx = super::zeroed(g.b * g.h * g.w * c);
        for_chunks(&mut dx, g.w * c, |row, dst| {
            let (bi, iy) = (row / g.h, row % g.h);
            for (ix, px) in dst.chunks_exact_mut(c.max(1)).enumerate() {
                for ky in 0..g.k {
                    // oy * s = iy + p - ky.
                    let ny = (iy + g.p) as isize - ky as isize;
                    if ny < 0 || !(ny as usize).is_multiple_of(g.s) || ny as usize / g.s >= g.ho {
                        continue;
                    }
                    let oy = ny as usize / g.s;
                    for kx in 0..g.k {
                        let nx = (ix + g.p) as isize - kx as isize;
                        if nx < 0 || !(nx as usize).is_multiple_of(g.s) || nx as usize / g.s >= g.wo
                        {
                            continue;
                        }
                        let ox = nx as usize / g.s;
                        let at = ((bi * g.ho + oy) * g.wo + ox) * c;
                        let wv = &wt[(ky * g.k + kx) * c..][..c];
                        for ((o, &gv), &wv) in px.iter_mut().zip(&gd[at..at + c]).zip(wv) {
                            *o += gv * wv;
                        }
                    }
                }
            }
        });
        Some(make(dx, &[g.b, g.h, g.w, c])?)
    } else {
        None
    };
    let dw = if need_dw {
        let kk = g.k * g.k;
        // Per output row a partial [k*k, C], summed in row order (deterministic).
        let parts: Vec<Vec<f32>> = (0..g.b * g.ho)
            .into_par_iter()
            .map(|row| {
                let (bi, oy) = (row / g.ho, row % g.ho);
                let mut acc = vec![0.0f32; kk * c];
                for ox in 0..g.wo {
                    let gat = ((bi * g.ho + oy) * g.wo + ox) * c;
                    let gv = &gd[gat..gat + c];
                    for ky in 0..g.k {
                        let Some(iy) = src(oy, ky, &g, g.h) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = src(ox, kx, &g, g.w) else {
                                continue;
                            };
                            let at = ((bi * g.h + iy) * g.w + ix) * c;
                            let a = &mut acc[(ky * g.k + kx) * c..][..c];
                            for ((o, &xv), &dv) in a.iter_mut().zip(&xd[at..at + c]).zip(gv) {
                                *o += xv * dv;
                            }
                        }
                    }
                }
                acc
            })
            .collect();
        let mut t = vec![0.0f32; kk * c];
        for p in &parts {
            for (o, v) in t.iter_mut().zip(p) {
                *o += v;
            }
        }
        let mut dw = vec![0.0f32; c * kk];
        for ch in 0..c {
            for tap in 0..kk {
                dw[ch * kk + tap] = t[tap * c + ch];
            }
        }
        Some(make(dw, &[c, 1, g.k, g.k])?)
    } else {
        None
    };
    let db = if bias {
        let mut db = vec![0.0f32; c];
        for px in gd.chunks_exact(c.max(1)) {
            for (o, v) in db.iter_mut().zip(px) {
                *o += v;
            }
        }
        Some(make(db, &[c])?)
    } else {
        None
    };
    Ok((dx, dw, db))
}
