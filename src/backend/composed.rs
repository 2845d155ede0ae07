//! TinyViT's ops (SPEC section 8) as compositions of the core ops: the trait's defaults, exact on
//! any backend, for backends without a dedicated kernel. The CPU reference overrides them with
//! direct implementations (`cpu::depthwise`, `cpu::attention_table`); a test checks that both
//! agree.
//!
//! - Depthwise convolution is the dense convolution with the block-diagonal weight
//!   (`W[o, c] = w[c]` when `o == c`, else 0): exact, `C` times the multiply-adds.
//! - Bias-table attention is the plain attention on augmented heads: per head the query gets
//!   `L` extra components `e_i / scale` (the one-hot of its position) and the key `j` gets the
//!   bias column `B_h[:, j]`, so `scale * <q'_i, k'_j> = scale * <q_i, k_j> + B_h[i, j]`; the
//!   values get `L` zero components, which are dropped from the output. Its gradient is the plain
//!   attention's on the same augmented heads; the table's gradient is the key gradient's extra
//!   components scattered back to the table's offsets.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `idx[i * L + j] = |yi - yj| * side + |xi - xj|` for a `side x side` window (row-major tokens).
pub fn bias_index(side: usize) -> Vec<usize> {
    let l = side * side;
    let mut idx = Vec::with_capacity(l * l);
    for i in 0..l {
        let (yi, xi) = (i / side, i % side);
        for j in 0..l {
            let (yj, xj) = (j / side, j % side);
            idx.push(yi.abs_diff(yj) * side + xi.abs_diff(xj));
        }
    }
    idx
}

/// `[C, 1, k, k]` -> the block-diagonal `[C, C, k, k]`.
fn dense_weight(w: &Tensor) -> Result<Tensor> {
    let s = w.shape();
    if s.len() != 4 || s[1] != 1 {
        return Err(Error::shape(
            "depthwise_conv2d",
            format!("weight {s:?}: expected [C, 1, k, k]"),
        ));
    }
    let (c, kk) = (s[0], s[2] * s[3]);
    let mut d = vec![0.0f32; c * c * kk];
    for ch in 0..c {
        d[(ch * c + ch) * kk..(ch * c + ch + 1) * kk]
            .copy_from_slice(&w.data()[ch * kk..(ch + 1) * kk]);
    }
    Tensor::from_vec(d, &[c, c, s[2], s[3]])
}

/// Depthwise convolution through the dense one (see the module comment).
pub fn depthwise_conv2d<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    b: Option<&B::Tensor>,
    stride: usize,
    pad: usize,
) -> Result<B::Tensor> {
    let dense = be.upload(&dense_weight(&be.download(w)?)?)?;
    be.conv2d(x, &dense, b, stride, pad)
}

/// Gradient of [`depthwise_conv2d`]: the dense gradient, whose weight part is read back on its
/// diagonal.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn depthwise_conv2d_backward<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    dy: &B::Tensor,
    stride: usize,
    pad: usize,
    need_dx: bool,
    need_dw: bool,
    bias: bool,
) -> Result<(Option<B::Tensor>, Option<B::Tensor>, Option<B::Tensor>)> {
    let dense = be.upload(&dense_weight(&be.download(w)?)?)?;
    let (dx, dwd, db) = be.conv2d_backward(x, &dense, dy, stride, pad, need_dx, bias)?;
    let dw = if need_dw {
        let full = be.download(&dwd)?;
        let s = full.shape().to_vec();
        let (c, kk) = (s[0], s[2] * s[3]);
        let mut d = vec![0.0f32; c * kk];
        for ch in 0..c {
            d[ch * kk..(ch + 1) * kk]
                .copy_from_slice(&full.data()[(ch * c + ch) * kk..(ch * c + ch + 1) * kk]);
        }
        Some(be.upload(&Tensor::from_vec(d, &[c, 1, s[2], s[3]])?)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

struct Augmented<T> {
    q: T,
    k: T,
    v: T,
    n: usize,
    l: usize,
    d: usize,
}

fn augment<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    side: usize,
    heads: usize,
    scale: f32,
    table: &B::Tensor,
) -> Result<Augmented<B::Tensor>> {
    let s = be.dims(qkv).to_vec();
    let l = side * side;
    if s.len() != 3 || heads == 0 || s[1] != l || s[2] % (3 * heads) != 0 {
        return Err(Error::shape(
            "attention_table",
            format!("qkv {s:?}: expected [N, {l}, 3 * {heads} * d]"),
        ));
    }
    let t = be.download(table)?;
    if t.shape() != [heads, l] {
        return Err(Error::shape(
            "attention_table",
            format!("table {:?}: expected [{heads}, {l}]", t.shape()),
        ));
    }
    let (n, c) = (s[0], s[2] / 3);
    let d = c / heads;
    let idx = bias_index(side);
    // Extra query components [1, L(i), H, L]: e_i / scale.
    let mut eq = vec![0.0f32; l * heads * l];
    // Extra key components [1, L(j), H, L(i)]: B_h[i, j].
    let mut ek = vec![0.0f32; l * heads * l];
    for i in 0..l {
        for h in 0..heads {
            eq[(i * heads + h) * l + i] = 1.0 / scale;
            for j in 0..l {
                ek[(j * heads + h) * l + i] = t.data()[h * l + idx[i * l + j]];
            }
        }
    }
    let rep = vec![0usize; n];
    let eq = be.index_select0(&be.upload(&Tensor::from_vec(eq, &[1, l, heads, l])?)?, &rep)?;
    let ek = be.index_select0(&be.upload(&Tensor::from_vec(ek, &[1, l, heads, l])?)?, &rep)?;
    let zeros = be.upload(&Tensor::zeros(&[n, l, heads, l]))?;
    let q4 = be.reshape(qkv, &[n, l, heads, 3 * d])?;
    let part = |i: usize| be.narrow(&q4, 3, i * d, d);
    let wide = [n, l, heads * (d + l)];
    let q = be.reshape(&be.concat(&[&part(0)?, &eq], 3)?, &wide)?;
    let k = be.reshape(&be.concat(&[&part(1)?, &ek], 3)?, &wide)?;
    let v = be.reshape(&be.concat(&[&part(2)?, &zeros], 3)?, &wide)?;
    Ok(Augmented { q, k, v, n, l, d })
}

/// The first `d` components of each augmented head: `[n, l, heads * (d + l)]` -> `[n, l, heads * d]`.
fn narrow_heads<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    a: &Augmented<B::Tensor>,
    heads: usize,
) -> Result<B::Tensor> {
    let x = be.reshape(x, &[a.n, a.l, heads, a.d + a.l])?;
    let x = be.narrow(&x, 3, 0, a.d)?;
    be.reshape(&x, &[a.n, a.l, heads * a.d])
}

/// Bias-table attention through the plain attention (see the module comment).
pub fn attention_table<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    side: usize,
    heads: usize,
    scale: f32,
    table: &B::Tensor,
) -> Result<B::Tensor> {
    let a = augment(be, qkv, side, heads, scale, table)?;
    let o = be.attention(&a.q, &a.k, &a.v, heads, scale, None)?;
    narrow_heads(be, &o, &a, heads)
}

/// Gradient of [`attention_table`]: `(dqkv, dtable if need_dtable)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_table_backward<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    table: &B::Tensor,
    d_o: &B::Tensor,
    side: usize,
    heads: usize,
    scale: f32,
    need_dtable: bool,
) -> Result<(B::Tensor, Option<B::Tensor>)> {
    let a = augment(be, qkv, side, heads, scale, table)?;
    let o = be.attention(&a.q, &a.k, &a.v, heads, scale, None)?;
    let (n, l, d) = (a.n, a.l, a.d);
    let g4 = be.reshape(d_o, &[n, l, heads, d])?;
    let zeros = be.upload(&Tensor::zeros(&[n, l, heads, l]))?;
    let g = be.reshape(&be.concat(&[&g4, &zeros], 3)?, &[n, l, heads * (d + l)])?;
    let gr = be.attention_backward(&a.q, &a.k, &a.v, &o, &g, heads, scale, None)?;
    let dq = narrow_heads(be, &gr.dq, &a, heads)?;
    let dk = narrow_heads(be, &gr.dk, &a, heads)?;
    let dv = narrow_heads(be, &gr.dv, &a, heads)?;
    let four = |t: &B::Tensor| be.reshape(t, &[n, l, heads, d]);
    let dqkv = be.concat(&[&four(&dq)?, &four(&dk)?, &four(&dv)?], 3)?;
    let dqkv = be.reshape(&dqkv, &[n, l, 3 * heads * d])?;
    let dtable = if need_dtable {
        let dk4 = be.reshape(&gr.dk, &[n, l, heads, d + l])?;
        let extra = be.narrow(&dk4, 3, d, l)?;
        let summed = be.download(&be.sum_rows(&extra, l * heads * l)?)?;
        let idx = bias_index(side);
        let mut dt = vec![0.0f32; heads * l];
        for j in 0..l {
            for h in 0..heads {
                for i in 0..l {
                    dt[h * l + idx[i * l + j]] += summed.data()[(j * heads + h) * l + i];
                }
            }
        }
        Some(be.upload(&Tensor::from_vec(dt, &[heads, l])?)?)
    } else {
        None
    };
    Ok((dqkv, dtable))
}
