//! Elementwise ops.
//!
//! * `add_scaled`: `y = alpha * a + beta * b`. Either `b` has `a`'s shape, or `b`'s shape (with
//!   leading ones dropped) is a suffix of `a`'s and `b` is tiled over `a`'s leading dimensions:
//!   `y[i] = alpha * a[i] + beta * b[i mod numel(b)]`.
//! * `activate`: `y = act(x)` (identity, ReLU, exact erf GELU).

use crate::backend::Act;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::{for_chunks, make, math};

/// `alpha * a + beta * b`, broadcasting `b` by tiling (see the module docs).
pub(crate) fn add_scaled(a: &Tensor, alpha: f32, b: &Tensor, beta: f32) -> Result<Tensor> {
    let (sa, sb) = (a.shape(), b.shape());
    let lead = sb.iter().take_while(|&&d| d == 1).count();
    let core = &sb[lead..];
    let ok = sa == sb || (core.len() <= sa.len() && sa[sa.len() - core.len()..] == *core);
    if !ok {
        return Err(Error::shape(
            "add_scaled",
            format!("b {sb:?} is neither a's shape {sa:?} nor a suffix of it"),
        ));
    }
    let (ad, bd) = (a.data(), b.data());
    let nb = bd.len();
    let mut out = super::zeroed(ad.len());
    if nb == 0 {
        return make(out, sa);
    }
    // Tasks cover ~8K elements: fixed slices when b is whole, else whole numbers of b-tiles so
    // each tile lines up with b from its start and the inner loop is a plain zip that vectorises.
    let whole = nb == ad.len();
    let chunk = if whole {
        8192.min(nb)
    } else {
        nb * (8192 / nb).max(1)
    };
    let f = |x: f32, z: f32| alpha * x + beta * z;
    for_chunks(&mut out, chunk, |i, dst| {
        let start = i * chunk;
        let src_a = &ad[start..start + dst.len()];
        if whole {
            let src_b = &bd[start..start + dst.len()];
            for ((y, &x), &z) in dst.iter_mut().zip(src_a).zip(src_b) {
                *y = f(x, z);
            }
        } else {
            for (dt, at) in dst.chunks_mut(nb).zip(src_a.chunks(nb)) {
                for ((y, &x), &z) in dt.iter_mut().zip(at).zip(bd) {
                    *y = f(x, z);
                }
            }
        }
    });
    make(out, sa)
}

/// `act(x)`.
pub(crate) fn activate(x: &Tensor, act: Act) -> Result<Tensor> {
    match act {
        // Tensors are immutable, so sharing the buffer is indistinguishable from a copy.
        Act::None => Ok(x.clone()),
        _ => {
            let mut out = x.data().to_vec();
            apply_act(&mut out, act);
            make(out, x.shape())
        }
    }
}

/// Applies `act` in place, in parallel over fixed slices when large.
pub(crate) fn apply_act(xs: &mut [f32], act: Act) {
    if act != Act::None {
        for_chunks(xs, 8192, |_, c| apply_act_serial(c, act));
    }
}

/// Applies `act` in place on the calling thread.
pub(crate) fn apply_act_serial(xs: &mut [f32], act: Act) {
    match act {
        Act::None => {}
        Act::Relu => {
            for v in xs.iter_mut() {
                // A select rather than `max` so NaN propagates as in PyTorch.
                *v = if *v < 0.0 { 0.0 } else { *v };
            }
        }
        Act::Gelu => math::gelu_inplace(xs),
    }
}
