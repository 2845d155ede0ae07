//! Dense products through the `gemm` crate.
//!
//! * `linear`: `y[m, n] = act(sum_k x[m, k] w[n, k] + b[n])`, `x` `[.., K]`, `w` `[N, K]`.
//! * `matmul`: `y[t] = a[t] @ b[t]` (`b[t]` `[K, N]`) or `a[t] @ b[t]^T` (`b[t]` `[N, K]`).
//!
//! `gemm::gemm` takes arbitrary row/column strides, so transposed operands are never copied;
//! `dst = alpha dst + beta lhs rhs`, with the bias pre-broadcast into `dst` when present.

use gemm::Parallelism;

use crate::backend::Act;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use rayon::prelude::*;

use super::bf16::{self, Prec};
use super::{elementwise::apply_act_serial, make, PAR_MIN};

/// Threading for one product of `m x k` by `k x n`: below ~2 MFLOP the fork/join overhead of
/// splitting across threads outweighs the work.
pub(crate) fn par_for(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < (1 << 20) {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// Strided matrix operand: base pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst (m x n, row stride dst_rs) = [dst +] scale * lhs (m x k) @ rhs (k x n)`.
///
/// # Safety
/// All pointers must cover the described strided extents; `dst` must not alias the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // gemm leaves dst untouched for an empty sum; the product is zero.
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// [`gemm_into`] in the precision `prec` says: f32 operands, or bf16 operands with f32
/// accumulation ([`bf16::gemm`]). The forward ops take every product through here.
///
/// # Safety
/// As [`gemm_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    prec: Prec,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    par: Parallelism,
) {
    match prec {
        Prec::F32 => gemm_into(m, n, k, dst, dst_rs, accumulate, lhs, rhs, scale, par),
        Prec::Bf16(kernel) => bf16::gemm(
            kernel, m, n, k, dst, dst_rs, accumulate, lhs, rhs, scale, par,
        ),
    }
}

/// A fresh `m x n` row-major product `lhs @ rhs`, written by gemm straight into unzeroed memory
/// (zeroing a buffer gemm overwrites anyway costs a full extra pass over it).
pub(crate) fn gemm_new(
    prec: Prec,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    par: Parallelism,
) -> Vec<f32> {
    let len = m * n;
    let mut out = super::with_capacity(len);
    // SAFETY: with accumulate = false, gemm_into writes every element of the m x n block (zeros
    // when k = 0) before anything reads it, so the length can be set afterwards.
    unsafe {
        product(
            prec,
            m,
            n,
            k,
            out.as_mut_ptr(),
            n,
            false,
            lhs,
            rhs,
            1.0,
            par,
        );
        out.set_len(len);
    }
    out
}

/// Adds the bias to each `n`-wide row and applies the activation, in one pass over the rows.
fn epilogue(rows: &mut [f32], n: usize, bias: Option<&[f32]>, act: Act) {
    if let Some(b) = bias {
        for row in rows.chunks_exact_mut(n) {
            for (y, &bb) in row.iter_mut().zip(b) {
                *y += bb;
            }
        }
    }
    apply_act_serial(rows, act);
}

/// `act(x @ w^T + b)`.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Act,
    prec: Prec,
) -> Result<Tensor> {
    let (sx, sw) = (x.shape(), w.shape());
    if sx.is_empty() || sw.len() != 2 || sw[1] != sx[sx.len() - 1] {
        return Err(Error::shape(
            "linear",
            format!("x {sx:?} with w {sw:?} (want [N, K])"),
        ));
    }
    let (n, k) = (sw[0], sw[1]);
    if let Some(b) = b {
        if b.shape() != [n] {
            return Err(Error::shape(
                "linear",
                format!("bias {:?}, want [{n}]", b.shape()),
            ));
        }
    }
    let m: usize = sx[..sx.len() - 1].iter().product();
    let lhs = Mat {
        ptr: x.data().as_ptr(),
        rs: k as isize,
        cs: 1,
    };
    // w is n x k row-major: read as the k x n right operand by swapping strides.
    let rhs = Mat {
        ptr: w.data().as_ptr(),
        rs: 1,
        cs: k as isize,
    };
    let bias = b.map(|b| b.data());
    let mut out = gemm_new(prec, m, n, k, lhs, rhs, par_for(m, n, k));
    if n > 0 && (bias.is_some() || act != Act::None) {
        // Row groups of >= 8K elements so the epilogue runs on all cores when large.
        let rows_per = (8192 / n).max(1);
        if out.len() >= PAR_MIN {
            out.par_chunks_mut(rows_per * n)
                .for_each(|c| epilogue(c, n, bias, act));
        } else {
            epilogue(&mut out, n, bias, act);
        }
    }
    let mut shape = sx.to_vec();
    *shape.last_mut().unwrap() = n;
    make(out, &shape)
}

/// Batched `a @ b` or `a @ b^T`.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_b: bool, prec: Prec) -> Result<Tensor> {
    let (sa, sb) = (a.shape(), b.shape());
    let bad = || Error::shape("matmul", format!("a {sa:?} b {sb:?} trans_b={trans_b}"));
    if sa.len() != 3 || sb.len() != 3 || sa[0] != sb[0] {
        return Err(bad());
    }
    let (bt, m, k) = (sa[0], sa[1], sa[2]);
    let (kb, n) = if trans_b {
        (sb[2], sb[1])
    } else {
        (sb[1], sb[2])
    };
    if kb != k {
        return Err(bad());
    }
    let mut out = super::zeroed(bt * m * n);
    let (rs, cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let (ad, bd) = (a.data(), b.data());
    let one = |t: usize, dst: &mut [f32], par: Parallelism| {
        // SAFETY: slices of batch t of a, b and out, each exactly the described matrix.
        unsafe {
            product(
                prec,
                m,
                n,
                k,
                dst.as_mut_ptr(),
                n,
                false,
                Mat {
                    ptr: ad[t * m * k..].as_ptr(),
                    rs: k as isize,
                    cs: 1,
                },
                Mat {
                    ptr: bd[t * k * n..].as_ptr(),
                    rs,
                    cs,
                },
                1.0,
                par,
            )
        }
    };
    if m * n == 0 {
        return make(out, &[bt, m, n]);
    }
    let par = par_for(m, n, k);
    if matches!(par, Parallelism::None) && bt > 1 && bt * m * n * k >= (1 << 20) {
        // Many small products: parallelise over the batch instead of inside each product.
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(t, dst)| one(t, dst, Parallelism::None));
    } else {
        for (t, dst) in out.chunks_mut(m * n).enumerate() {
            one(t, dst, par);
        }
    }
    make(out, &[bt, m, n])
}
