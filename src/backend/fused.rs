//! The plain op sequences behind the fused ops of [`Backend`]: the defaults of
//! `linear_residual`, `add_layer_norm` and `attention_qkv` (its three token maps).
//!
//! They are the definition of those ops (the CPU reference runs exactly these), and a backend
//! that overrides an op can still call them, e.g. when it was asked not to fuse.

use super::{Act, Backend, RelPos, Tokens};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `r + alpha * (x @ w^T + b)`: [`Backend::linear`], then [`Backend::add_scaled`].
pub fn linear_residual<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    b: Option<&B::Tensor>,
    r: &B::Tensor,
    alpha: f32,
) -> Result<B::Tensor> {
    let y = be.linear(x, w, b, Act::None)?;
    if be.dims(&y) != be.dims(r) {
        return Err(Error::shape(
            "linear_residual",
            format!("output {:?} vs residual {:?}", be.dims(&y), be.dims(r)),
        ));
    }
    be.add_scaled(r, 1.0, &y, alpha)
}

/// `(s, layer_norm(s))` with `s = a + beta * b`.
pub fn add_layer_norm<B: Backend + ?Sized>(
    be: &B,
    a: &B::Tensor,
    b: &B::Tensor,
    beta: f32,
    g: &B::Tensor,
    bias: &B::Tensor,
    eps: f32,
) -> Result<(B::Tensor, B::Tensor)> {
    if be.dims(a) != be.dims(b) {
        return Err(Error::shape(
            "add_layer_norm",
            format!("{:?} + {:?}", be.dims(a), be.dims(b)),
        ));
    }
    let s = be.add_scaled(a, 1.0, b, beta)?;
    let y = be.layer_norm(&s, g, bias, eps)?;
    Ok((s, y))
}

/// Checks `qkv` `[B, H, W, 3 * heads * d]` and returns `(B, H, W, 3 * heads * d)`.
fn qkv_map_dims(
    op: &'static str,
    s: &[usize],
    heads: usize,
) -> Result<(usize, usize, usize, usize)> {
    if s.len() != 4 || heads == 0 || !s[3].is_multiple_of(3 * heads) || s[3] == 0 {
        return Err(Error::shape(
            op,
            format!("{s:?} is not [B, H, W, 3 * heads * d] with {heads} heads"),
        ));
    }
    Ok((s[0], s[1], s[2], s[3]))
}

/// The shape checks of [`Tokens::Windows`] attention (every backend's): returns
/// `(B, H, W, 3 * heads * d)` for `qkv` `s`, a pad row of `pad_len` elements and window `ws`.
pub(crate) fn windowed_dims(
    s: &[usize],
    pad_len: usize,
    ws: usize,
    heads: usize,
) -> Result<(usize, usize, usize, usize)> {
    let d = qkv_map_dims("attention_qkv_windowed", s, heads)?;
    if ws == 0 || pad_len != d.3 {
        return Err(Error::shape(
            "attention_qkv_windowed",
            format!("window {ws}, pad row of {pad_len} for rows of {}", d.3),
        ));
    }
    Ok(d)
}

/// The shape checks of [`Tokens::Depth`] attention (every backend's): returns
/// `(V * depth, h, w, 3 * heads * d)` for `qkv` `s`.
pub(crate) fn depth_dims(
    s: &[usize],
    depth: usize,
    heads: usize,
) -> Result<(usize, usize, usize, usize)> {
    let d = qkv_map_dims("attention_qkv_depth", s, heads)?;
    if depth == 0 || !d.0.is_multiple_of(depth) {
        return Err(Error::shape(
            "attention_qkv_depth",
            format!(
                "a batch of {} maps is not a whole number of {depth}-slice volumes",
                d.0
            ),
        ));
    }
    Ok(d)
}

/// [`Tokens::Sequences`]: the packed projection split into q, k and v, then
/// [`Backend::attention`].
pub fn attention_qkv_sequences<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, B::Tensor>>,
) -> Result<B::Tensor> {
    let s = be.dims(qkv).to_vec();
    if s.len() != 3 || s[2] % 3 != 0 {
        return Err(Error::shape(
            "attention_qkv",
            format!("{s:?} is not [B, L, 3*D]"),
        ));
    }
    let d = s[2] / 3;
    let q = be.narrow(qkv, 2, 0, d)?;
    let k = be.narrow(qkv, 2, d, d)?;
    let v = be.narrow(qkv, 2, 2 * d, d)?;
    be.attention(&q, &k, &v, heads, scale, rel)
}

/// [`Tokens::Windows`]: window partition of a packed projection whose padding tokens are
/// `pad`, attention per window, unpartition.
///
/// [`Backend::window_partition`] pads with zeros; the padding rows are then set to `pad` by adding
/// the outer product `mask x pad` (mask = 1 on padding rows). Both terms are exact: a real row
/// adds `0 * pad = 0`, a padding row is `0 + 1 * pad`.
pub fn attention_qkv_windowed<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    pad: &B::Tensor,
    ws: usize,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, B::Tensor>>,
) -> Result<B::Tensor> {
    let pad_len = be.dims(pad).iter().product();
    let (b, h, w, c3) = windowed_dims(be.dims(qkv), pad_len, ws, heads)?;
    let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
    let mut p = be.window_partition(qkv, ws)?;
    if h % ws != 0 || w % ws != 0 {
        let n = b * nh * nw * ws * ws;
        let mut mask = vec![0f32; n];
        for (i, m) in mask.iter_mut().enumerate() {
            let t = i % (ws * ws);
            let win = (i / (ws * ws)) % (nh * nw);
            let y = (win / nw) * ws + t / ws;
            let x = (win % nw) * ws + t % ws;
            if y >= h || x >= w {
                *m = 1.0;
            }
        }
        let mask = be.upload(&Tensor::from_vec(mask, &[1, n, 1])?)?;
        let pad = be.reshape(pad, &[1, 1, c3])?;
        let fill = be.matmul(&mask, &pad, false)?;
        let fill = be.reshape(&fill, be.dims(&p))?;
        p = be.add_scaled(&p, 1.0, &fill, 1.0)?;
    }
    let p = be.reshape(&p, &[b * nh * nw, ws * ws, c3])?;
    let o = be.attention_qkv(&p, Tokens::Sequences, heads, scale, rel)?;
    let o = be.reshape(&o, &[b * nh * nw, ws, ws, c3 / 3])?;
    be.window_unpartition(&o, ws, (h, w))
}

/// [`Tokens::Depth`]: slice-major -> depth-major, attention over each token's slices, back to
/// slice-major.
pub fn attention_qkv_depth<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    depth: usize,
    heads: usize,
    scale: f32,
    rel: Option<RelPos<'_, B::Tensor>>,
) -> Result<B::Tensor> {
    let (n, h, w, c3) = depth_dims(be.dims(qkv), depth, heads)?;
    let v = n / depth;
    let x = be.reshape(qkv, &[v, depth, h * w, c3])?;
    let x = be.permute(&x, &[0, 2, 1, 3])?;
    let x = be.reshape(&x, &[v * h * w, depth, c3])?;
    let o = be.attention_qkv(&x, Tokens::Sequences, heads, scale, rel)?;
    let o = be.reshape(&o, &[v, h * w, depth, c3 / 3])?;
    let o = be.permute(&o, &[0, 2, 1, 3])?;
    be.reshape(&o, &[n, h, w, c3 / 3])
}
