//! The CPU reference backend (f32, or bf16 products with f32 accumulation): the executable
//! specification of every op.
//!
//! Tensors are host [`Tensor`]s (shape + shared contiguous row-major buffer), so upload/download
//! are reference-count clones. Work is spread over rayon's global pool (RAYON_NUM_THREADS or all
//! cores); the heavy products go through the `gemm` crate. This file holds the struct and the
//! memory/layout ops (pure data movement); the arithmetic lives in the sibling modules:
//!
//! * `elementwise`: `y = alpha a + beta b` with tiling broadcast, activations;
//! * [`math`]: vectorised `exp` / `erf` kernels;
//! * `linalg`: linear and batched matmul (`gemm`), and `product`, through which every forward
//!   product goes in the backend's precision;
//! * `bf16`: the bf16 products of `--precision bf16` (AVX512-BF16 and portable kernels);
//! * `norm`: layer norm;
//! * `attention`: blocked multi-head attention with decomposed relative-position bias;
//! * `conv`: conv2d (im2col + gemm) and the 2x2 stride-2 transposed conv (gemm + scatter);
//! * `resize`: bilinear / bicubic interpolation;
//! * `backward`: the gradients of all of the above that training needs.

mod attention;
mod attention_backward;
mod attention_table;
mod backward;
mod bf16;
mod conv;
mod depthwise;
mod elementwise;
mod linalg;
pub mod math;
mod norm;
mod resize;

use rayon::prelude::*;

pub use bf16::Bf16Kernel;
use bf16::Prec;

use super::{Act, AttentionGrads, Backend, Precision, RelPos, RunOptions, Tokens};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Below this many elements an op runs on the calling thread: rayon's fork/join costs a few
/// microseconds, more than copying or transforming a small tensor.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// The CPU backend. Threads come from rayon's global pool.
#[derive(Clone, Debug)]
pub struct Cpu {
    /// Whether the model takes its fused path ([`RunOptions::fused`]; both paths compute the
    /// same thing).
    fuse: bool,
    /// The forward products' precision (backward products are always f32).
    prec: Prec,
}

impl Cpu {
    /// A CPU backend on rayon's global thread pool, with the default [`RunOptions`] (the host
    /// pool keeps whatever cap it has), in f32.
    pub fn new() -> Self {
        Cpu {
            fuse: RunOptions::default().fused,
            prec: Prec::F32,
        }
    }

    /// A CPU backend running as `o` says (the attention kernel options are CUDA's; the host
    /// pool's cap is process-wide and set here), in f32.
    pub fn with_options(o: &RunOptions) -> Self {
        crate::host_pool::set_cap_mb(o.host_pool_mb);
        Cpu {
            fuse: o.fused,
            prec: Prec::F32,
        }
    }

    /// The same backend with its forward products in `p`: bf16 operands with f32 accumulation
    /// on the fastest kernel this CPU has ([`Bf16Kernel::detect`]), or f32. Storage, softmax,
    /// norms, activations and every backward product stay f32.
    pub fn with_precision(self, p: Precision) -> Self {
        match p {
            Precision::F32 => Cpu {
                prec: Prec::F32,
                ..self
            },
            Precision::Bf16 => Cpu {
                prec: Prec::Bf16(Bf16Kernel::detect()),
                ..self
            },
        }
    }

    /// The same backend with bf16 products on `kernel`, which must run on this CPU (tests use
    /// it to check every kernel against every other).
    pub fn with_bf16_kernel(self, kernel: Bf16Kernel) -> Result<Self> {
        if !kernel.available() {
            return Err(Error::Input(format!(
                "the {kernel:?} bf16 kernel does not run on this CPU"
            )));
        }
        Ok(Cpu {
            prec: Prec::Bf16(kernel),
            ..self
        })
    }

    /// The forward products' precision.
    pub fn precision(&self) -> Precision {
        match self.prec {
            Prec::F32 => Precision::F32,
            Prec::Bf16(_) => Precision::Bf16,
        }
    }

    /// The bf16 kernel in use (`None` in f32).
    pub fn bf16_kernel(&self) -> Option<Bf16Kernel> {
        match self.prec {
            Prec::F32 => None,
            Prec::Bf16(k) => Some(k),
        }
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

/// A raw pointer that may cross threads; used where parallel tasks write provably disjoint parts
/// of one output buffer that cannot be split into slices up front (strided layouts).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every user writes disjoint elements from each task and the buffer outlives the scope.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method (rather than field access) so closures capture the whole wrapper,
    /// which is `Sync`, instead of the bare pointer field.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Buffers at least this large (bytes) are backed by transparent huge pages where the kernel
/// allows it on request (`madvise` mode): a fresh 50 MB activation otherwise takes ~12K page
/// faults, which measured ~20% of a large linear layer.
const HUGE_MIN_BYTES: usize = 4 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
}

/// Asks for huge pages over the 2 MiB-aligned interior of `v`'s allocation (a hint: failure or
/// an unsupported kernel just leaves normal pages).
fn advise_huge(v: &mut Vec<f32>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        let bytes = v.capacity() * 4;
        if bytes < HUGE_MIN_BYTES {
            return;
        }
        let start = v.as_mut_ptr() as usize;
        let lo = start.next_multiple_of(HUGE);
        let hi = (start + bytes) / HUGE * HUGE;
        if hi > lo {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes no
            // contents, only how future faults are served.
            unsafe {
                madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = v;
}

/// A zero-filled buffer of `n` floats: a pooled one (`crate::host_pool`) or a fresh one,
/// huge-page backed when large.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    if let Some(mut v) = crate::host_pool::take(n) {
        v.resize(n, 0.0);
        return v;
    }
    // calloc leaves fresh large blocks untouched (the kernel's pages are already zero), so the
    // advice still applies to every page's first fault.
    let mut v = vec![0.0f32; n];
    advise_huge(&mut v);
    v
}

/// An empty buffer with room for `n` floats (huge-page backed when large), for producers that
/// write every element through the raw pointer before `set_len`.
pub(crate) fn with_capacity(n: usize) -> Vec<f32> {
    if let Some(v) = crate::host_pool::take(n) {
        return v;
    }
    let mut v = Vec::with_capacity(n);
    advise_huge(&mut v);
    v
}

/// Builds an output tensor; `data.len()` always matches `shape` by construction in this backend.
pub(crate) fn make(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape)
}

/// Splits `out` into chunks of `chunk` elements and runs `f(chunk_index, chunk)` on each, in
/// parallel when the tensor is large enough to pay for it.
pub(crate) fn for_chunks(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if chunk == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PAR_MIN {
        // Group small chunks so each task moves at least ~4K elements.
        let per = (4096 / chunk).max(1);
        out.par_chunks_mut(chunk * per)
            .enumerate()
            .for_each(|(g, grp)| {
                for (i, c) in grp.chunks_mut(chunk).enumerate() {
                    f(g * per + i, c);
                }
            });
    } else {
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            f(i, c);
        }
    }
}

fn check_perm(op: &'static str, rank: usize, perm: &[usize]) -> Result<()> {
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

fn strides(shape: &[usize]) -> Vec<usize> {
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
fn permute_data(x: &[f32], dims: &[usize], st: &[usize]) -> Vec<f32> {
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
fn partition_padded(x: &Tensor, ws: usize, pad: Option<&[f32]>) -> Result<Tensor> {
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

impl Backend for Cpu {
    type Tensor = Tensor;

    fn name(&self) -> String {
        match self.prec {
            Prec::F32 => format!("cpu ({} threads)", rayon::current_num_threads()),
            Prec::Bf16(k) => format!(
                "cpu ({} threads, bf16 products: {})",
                rayon::current_num_threads(),
                k.describe()
            ),
        }
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn dims<'a>(&self, t: &'a Tensor) -> &'a [usize] {
        t.shape()
    }

    fn reshape(&self, t: &Tensor, shape: &[usize]) -> Result<Tensor> {
        t.reshape(shape)
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        let shape = x.shape();
        check_perm("permute", shape.len(), perm)?;
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let ist = strides(shape);
        // Simplify: drop size-1 axes, then merge output-adjacent axes that are also adjacent (in
        // order) in the input, so e.g. NCHW->NHWC becomes a batched 2-D transpose.
        let mut dims: Vec<usize> = Vec::new();
        let mut st: Vec<usize> = Vec::new();
        for &p in perm {
            if shape[p] == 1 {
                continue;
            }
            // Mergeable when stepping the previous axis once equals running through all of p.
            match st.last() {
                Some(&prev) if prev == ist[p] * shape[p] => {
                    let l = dims.len() - 1;
                    dims[l] *= shape[p];
                    st[l] = ist[p];
                }
                _ => {
                    dims.push(shape[p]);
                    st.push(ist[p]);
                }
            }
        }
        let data = permute_data(x.data(), &dims, &st);
        make(data, &out_shape)
    }

    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = xs
            .first()
            .ok_or_else(|| Error::shape("concat", "no inputs"))?;
        let r = first.rank();
        if dim >= r {
            return Err(Error::shape("concat", format!("dim {dim} for rank {r}")));
        }
        let mut out_shape = first.shape().to_vec();
        out_shape[dim] = 0;
        for t in xs {
            let s = t.shape();
            if s.len() != r || (0..r).any(|a| a != dim && s[a] != first.shape()[a]) {
                return Err(Error::shape(
                    "concat",
                    format!(
                        "shapes {:?} and {:?} differ outside dim {dim}",
                        first.shape(),
                        s
                    ),
                ));
            }
            out_shape[dim] += s[dim];
        }
        let inner: usize = out_shape[dim + 1..].iter().product();
        let row = out_shape[dim] * inner;
        let n: usize = out_shape.iter().product();
        let mut out = zeroed(n);
        for_chunks(&mut out, row, |o, dst| {
            let mut at = 0;
            for t in xs {
                let len = t.shape()[dim] * inner;
                dst[at..at + len].copy_from_slice(&t.data()[o * len..(o + 1) * len]);
                at += len;
            }
        });
        make(out, &out_shape)
    }

    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let s = x.shape();
        if dim >= s.len() || start + len > s[dim] {
            return Err(Error::shape(
                "narrow",
                format!("{start}..{} along dim {dim} of {s:?}", start + len),
            ));
        }
        let inner: usize = s[dim + 1..].iter().product();
        let mut out_shape = s.to_vec();
        out_shape[dim] = len;
        let n: usize = out_shape.iter().product();
        let mut out = zeroed(n);
        let (row_in, row_out) = (s[dim] * inner, len * inner);
        let src = x.data();
        for_chunks(&mut out, row_out, |o, dst| {
            let b = o * row_in + start * inner;
            dst.copy_from_slice(&src[b..b + row_out]);
        });
        make(out, &out_shape)
    }

    fn index_select0(&self, x: &Tensor, index: &[usize]) -> Result<Tensor> {
        let s = x.shape();
        if s.is_empty() {
            return Err(Error::shape("index_select0", "scalar input"));
        }
        if let Some(&bad) = index.iter().find(|&&i| i >= s[0]) {
            return Err(Error::shape(
                "index_select0",
                format!("index {bad} for {s:?}"),
            ));
        }
        let row: usize = s[1..].iter().product();
        let mut out_shape = s.to_vec();
        out_shape[0] = index.len();
        let mut out = zeroed(index.len() * row);
        let src = x.data();
        for_chunks(&mut out, row, |i, dst| {
            dst.copy_from_slice(&src[index[i] * row..(index[i] + 1) * row]);
        });
        make(out, &out_shape)
    }

    fn window_partition(&self, x: &Tensor, ws: usize) -> Result<Tensor> {
        partition_padded(x, ws, None)
    }

    fn fused(&self) -> bool {
        self.fuse
    }

    fn attention_qkv(
        &self,
        qkv: &Tensor,
        tokens: Tokens<'_, Tensor>,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<Tensor> {
        let (ws, pad) = match tokens {
            Tokens::Windows { ws, pad } => (ws, pad),
            Tokens::Sequences => {
                return crate::backend::fused::attention_qkv_sequences(self, qkv, heads, scale, rel)
            }
            Tokens::Depth { depth } => {
                return crate::backend::fused::attention_qkv_depth(
                    self, qkv, depth, heads, scale, rel,
                )
            }
        };
        // The plain sequence of `backend::fused`, with the padding rows written by the partition
        // itself instead of by an extra outer product and add over the whole tensor.
        let (b, h, w, c3) =
            crate::backend::fused::windowed_dims(qkv.shape(), pad.numel(), ws, heads)?;
        let p = partition_padded(qkv, ws, Some(pad.data()))?;
        let nwin = b * h.div_ceil(ws) * w.div_ceil(ws);
        let p = p.reshape(&[nwin, ws * ws, c3])?;
        let o = self.attention_qkv(&p, Tokens::Sequences, heads, scale, rel)?;
        let o = o.reshape(&[nwin, ws, ws, c3 / 3])?;
        self.window_unpartition(&o, ws, (h, w))
    }

    fn window_unpartition(&self, x: &Tensor, ws: usize, hw: (usize, usize)) -> Result<Tensor> {
        let s = x.shape();
        let (h, w) = hw;
        let (nh, nw) = (h.div_ceil(ws.max(1)), w.div_ceil(ws.max(1)));
        if s.len() != 4
            || ws == 0
            || s[1] != ws
            || s[2] != ws
            || nh * nw == 0
            || !s[0].is_multiple_of(nh * nw)
        {
            return Err(Error::shape(
                "window_unpartition",
                format!("{s:?} with window {ws} into {h}x{w}"),
            ));
        }
        let c = s[3];
        let b = s[0] / (nh * nw);
        let mut out = zeroed(b * h * w * c);
        let src = x.data();
        for_chunks(&mut out, w * c, |row, dst| {
            let (bi, y) = (row / h, row % h);
            let (wy, r) = (y / ws, y % ws);
            for wx in 0..nw {
                let win = (bi * nh + wy) * nw + wx;
                let x0 = wx * ws;
                let cols = ws.min(w - x0);
                let at = (win * ws + r) * ws * c;
                dst[x0 * c..(x0 + cols) * c].copy_from_slice(&src[at..at + cols * c]);
            }
        });
        make(out, &[b, h, w, c])
    }

    fn add_scaled(&self, a: &Tensor, alpha: f32, b: &Tensor, beta: f32) -> Result<Tensor> {
        elementwise::add_scaled(a, alpha, b, beta)
    }

    fn activate(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        elementwise::activate(x, act)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
        linalg::linear(x, w, b, act, self.prec)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_b: bool) -> Result<Tensor> {
        linalg::matmul(a, b, trans_b, self.prec)
    }

    fn layer_norm(&self, x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
        norm::layer_norm(x, g, b, eps)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<Tensor> {
        attention::attention(q, k, v, heads, scale, rel, self.prec)
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        conv::conv2d(x, w, b, stride, pad, self.prec)
    }

    fn depthwise_conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor> {
        depthwise::depthwise_conv2d(x, w, b, stride, pad)
    }

    fn depthwise_conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        need_dw: bool,
        bias: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        depthwise::depthwise_conv2d_backward(x, w, dy, stride, pad, need_dx, need_dw, bias)
    }

    fn attention_table(
        &self,
        qkv: &Tensor,
        side: usize,
        heads: usize,
        scale: f32,
        table: &Tensor,
    ) -> Result<Tensor> {
        attention_table::attention_table(qkv, side, heads, scale, table, self.prec)
    }

    fn attention_table_backward(
        &self,
        qkv: &Tensor,
        table: &Tensor,
        d_o: &Tensor,
        side: usize,
        heads: usize,
        scale: f32,
        need_dtable: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        attention_table::attention_table_backward(qkv, table, d_o, side, heads, scale, need_dtable)
    }

    fn conv_transpose2x2(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        conv::conv_transpose2x2(x, w, b, self.prec)
    }

    fn resize_bilinear(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        resize::resize(x, size, resize::Mode::Bilinear)
    }

    fn resize_bicubic(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        resize::resize(x, size, resize::Mode::Bicubic)
    }

    fn activate_backward(&self, x: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
        backward::activate_backward(x, dy, act)
    }

    fn sum_rows(&self, x: &Tensor, cols: usize) -> Result<Tensor> {
        backward::sum_rows(x, cols)
    }

    fn linear_backward_input(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        backward::linear_backward_input(dy, w)
    }

    fn linear_backward_weight(
        &self,
        x: &Tensor,
        dy: &Tensor,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        backward::linear_backward_weight(x, dy, bias)
    }

    fn layer_norm_backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        dy: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        backward::layer_norm_backward(x, g, dy, eps)
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, Tensor>>,
    ) -> Result<AttentionGrads<Tensor>> {
        backward::attention_backward(q, k, v, o, d_o, heads, scale, rel)
    }

    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        backward::conv2d_backward(x, w, dy, stride, pad, need_dx, bias)
    }

    fn conv_transpose2x2_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        backward::conv_transpose2x2_backward(x, w, dy)
    }
}
