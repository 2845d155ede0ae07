//! Pure data movement of the CPU backend: permutation checks and kernels, SAM's padded window
//! partition.

use rayon::prelude::*;

use super::{for_chunks, make, zeroed, SendPtr, PAR_MIN};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(super) fn check_perm(op: &'static str, rank: usize, perm: &[usize]) -> Result<()> {
    let mut seen = vec![false; rank];
    if perm.len() != rank {
        return Err(Error::shape(
            op,
            format!("perm {perm:?} for a rank-{rank} tensor"),
        ));
    }
    for &p in perm {
        if p >= rank || seen[p] {
            return Err(Error::shape(
                op,
                format!("{perm:?} is not a permutation of 0..{rank}"),
            ));
        }
        seen[p] = true;
    }
    Ok(())
}

pub(super) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Offset into the input of the `idx`-th element of a multi-index space `dims` whose axes have
/// input strides `st` (row-major decomposition).
#[inline]
fn offset_of(mut idx: usize, dims: &[usize], st: &[usize]) -> usize {
    let mut off = 0;
    for a in (0..dims.len()).rev() {
        off += (idx % dims[a]) * st[a];
        idx /= dims[a];
    }
    off
}

/// `permute` on the simplified problem: output axes `dims` with input strides `st` (size-1 axes
/// dropped and input-adjacent axes merged by the caller).
pub(super) fn permute_data(x: &[f32], dims: &[usize], st: &[usize]) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let mut out = zeroed(n);
    let r = dims.len();
    if r == 0 {
        out.copy_from_slice(x);
        return out;
    }
    let last = dims[r - 1];
    if st[r - 1] == 1 {
        // The output's innermost axis is contiguous in the input too: copy runs.
        let (od, os) = (&dims[..r - 1], &st[..r - 1]);
        for_chunks(&mut out, last, |row, dst| {
            let o = offset_of(row, od, os);
            dst.copy_from_slice(&x[o..o + last]);
        });
        return out;
    }
    // Otherwise some other output axis `q` is the input's contiguous one: a (batched) transpose
    // between axis q and the last axis. Tiles of TxT keep both reads and writes in cache lines.
    const T: usize = 32;
    let q = (0..r - 1)
        .find(|&a| st[a] == 1)
        .expect("some axis has input stride 1");
    let qn = dims[q];
    let s_last = st[r - 1];
    let ostr = strides(dims);
    let os_q = ostr[q];
    let outer_axes: Vec<usize> = (0..r - 1).filter(|&a| a != q).collect();
    let odims: Vec<usize> = outer_axes.iter().map(|&a| dims[a]).collect();
    let oin: Vec<usize> = outer_axes.iter().map(|&a| st[a]).collect();
    let oout: Vec<usize> = outer_axes.iter().map(|&a| ostr[a]).collect();
    let outer: usize = odims.iter().product();
    let qblocks = qn.div_ceil(T);
    let ptr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (o, qb) = (t / qblocks, t % qblocks);
        let in_off = offset_of(o, &odims, &oin);
        let out_off = offset_of(o, &odims, &oout);
        let q0 = qb * T;
        let q1 = (q0 + T).min(qn);
        for l0 in (0..last).step_by(T) {
            let l1 = (l0 + T).min(last);
            for qi in q0..q1 {
                let dst = out_off + qi * os_q;
                for li in l0..l1 {
                    // SAFETY: (o, qi, li) enumerates each output element exactly once across
                    // tasks, and dst + li < n.
                    unsafe { *ptr.get().add(dst + li) = x[in_off + qi + li * s_last] };
                }
            }
        }
    };
    if n >= PAR_MIN {
        (0..outer * qblocks).into_par_iter().for_each(task);
    } else {
        (0..outer * qblocks).for_each(task);
    }
    out
}

/// SAM's `window_partition` of `x` `[B, H, W, C]` into `[B * nh * nw, ws, ws, C]`; padding
/// positions (bottom/right) are zeros, or the row `pad` `[C]` when given.
pub(super) fn partition_padded(x: &Tensor, ws: usize, pad: Option<&[f32]>) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 || ws == 0 || pad.is_some_and(|p| p.len() != s[3]) {
        return Err(Error::shape(
            "window_partition",
            format!("{s:?} with window {ws}"),
        ));
    }
    let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
    let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
    let nwin = b * nh * nw;
    let mut out = zeroed(nwin * ws * ws * c);
    let src = x.data();
    // One task per window row; what lies outside the image stays zero or gets the pad row.
    for_chunks(&mut out, ws * c, |idx, dst| {
        let (win, r) = (idx / ws, idx % ws);
        let bi = win / (nh * nw);
        let (wy, wx) = ((win / nw) % nh, win % nw);
        let y = wy * ws + r;
        let x0 = wx * ws;
        let cols = if y < h { ws.min(w - x0) } else { 0 };
        if cols > 0 {
            let at = ((bi * h + y) * w + x0) * c;
            dst[..cols * c].copy_from_slice(&src[at..at + cols * c]);
        }
        if let Some(p) = pad {
            for t in cols..ws {
                dst[t * c..(t + 1) * c].copy_from_slice(p);
            }
        }
    });
    make(out, &[nwin, ws, ws, c])
}
