//! The CPU reference backend (f32, or bf16 products with f32 accumulation): the executable
//! specification of every op.
//!
//! Tensors are host [`Tensor`]s (shape + shared contiguous row-major buffer), so upload/download
//! are reference-count clones. Work is spread over rayon's global pool (RAYON_NUM_THREADS or all
//! cores); the heavy products go through the `gemm` crate. This file holds the struct and the
//! memory/layout ops (pure data movement; their helpers: `buffers` for output allocation and
//! parallel chunking, `layout` for permutes and window partitions); the arithmetic lives in the
//! sibling modules:
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
mod buffers;
mod conv;
mod depthwise;
mod elementwise;
mod layout;
mod linalg;
pub mod math;
mod norm;
mod resize;

pub use bf16::Bf16Kernel;
use bf16::Prec;
pub(crate) use buffers::{for_chunks, make, with_capacity, zeroed, SendPtr};
use layout::{check_perm, partition_padded, permute_data, strides};

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
