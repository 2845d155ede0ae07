//! The CUDA backward ops: launchers of `kernels/backward.cu` (activation, column sums,
//! LayerNorm, col2im, attention) and the cuBLASLt GEMMs of the linear and conv gradients.
//!
//! Each launcher checks shapes, allocates its outputs (and f32 scratch) from the pool and
//! launches with the geometry documented in the kernel file's header. Scratch buffers are
//! released to the pool when they go out of scope: every kernel runs on the backend's one
//! stream, so a later op reusing the block is ordered after the kernels that read it.

use std::sync::Arc;

use super::gemm::GemmSpec;
use super::{dev, Arg, Cuda, CudaTensor, DevBuf};
use crate::backend::{Act, AttentionGrads, RelPos};
use crate::error::{Error, Result};

fn shape_err(op: &'static str, msg: String) -> Error {
    Error::shape(op, msg)
}

/// Head dims the attention backward kernels are built for (`kernels/backward.cu`).
const ATTN_BWD_MAX_D: usize = 128;
/// Query/key tile of the attention backward kernels.
const ATTN_TILE: usize = 64;
/// Most partial rows a column sum reduces in its second pass.
const COLSUM_MAX_PARTS: usize = 256;
/// Most CTAs (= partial rows of dg, db) of `layernorm_bwd`.
const LN_BWD_MAX_BLOCKS: usize = 1024;

/// An f32 device scratch buffer (partial sums, softmax statistics), back to the pool on drop.
struct Scratch(DevBuf);

impl Scratch {
    fn ptr(&self) -> u64 {
        self.0.ptr
    }
}

impl Cuda {
    /// `n` f32 of uninitialised scratch.
    fn scratch(&self, n: usize) -> Result<Scratch> {
        let (ptr, size) = self.pool.alloc(n.max(1) * 4)?;
        Ok(Scratch(DevBuf {
            ptr,
            size,
            pool: self.pool.clone(),
        }))
    }

    /// Sets `bytes` bytes at `ptr` to zero, in stream order.
    fn memset0(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(dev)?;
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(dev)
    }

    /// A zero-filled tensor.
    fn zeros_dev(&self, shape: &[usize]) -> Result<CudaTensor> {
        let y = self.empty(shape)?;
        self.memset0(y.ptr(), y.numel() * self.precision.size())?;
        Ok(y)
    }

    /// `y[c] = sum_p part[p, c]` (f32 partials `[nparts, cols]`) in fixed order, as storage.
    fn colsum_fin(&self, part: u64, nparts: usize, cols: usize) -> Result<CudaTensor> {
        let y = self.empty(&[cols])?;
        if cols > 0 {
            self.launch(
                "colsum_fin",
                (cols.div_ceil(32) as u32, 1, 1),
                (32, 8, 1),
                0,
                &[
                    Arg::P(part),
                    Arg::P(y.ptr()),
                    Arg::I(nparts as i32),
                    Arg::I(cols as i32),
                ],
            )?;
        }
        Ok(y)
    }

    /// Column sums of `x` viewed as `[rows, cols]`: partial sums over row chunks, then the
    /// chunks in order.
    pub(super) fn sum_rows_impl(&self, x: &CudaTensor, cols: usize) -> Result<CudaTensor> {
        let n = x.numel();
        if cols == 0 || !n.is_multiple_of(cols) || cols > i32::MAX as usize {
            return Err(shape_err(
                "sum_rows",
                format!("{n} elements are not rows of {cols}"),
            ));
        }
        let rows = n / cols;
        if rows > i32::MAX as usize {
            return Err(shape_err("sum_rows", format!("{rows} rows")));
        }
        // ~64 rows per partial, at most COLSUM_MAX_PARTS partials.
        let nparts = rows.div_ceil(64).clamp(1, COLSUM_MAX_PARTS);
        let chunk = rows.div_ceil(nparts).max(1);
        let nparts = rows.div_ceil(chunk);
        let part = self.scratch(nparts * cols)?;
        if nparts > 0 {
            self.launch(
                "colsum_part",
                (cols.div_ceil(32) as u32, nparts as u32, 1),
                (32, 8, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(part.ptr()),
                    Arg::I(rows as i32),
                    Arg::I(cols as i32),
                    Arg::I(chunk as i32),
                ],
            )?;
        }
        self.colsum_fin(part.ptr(), nparts, cols)
    }

    /// `dx = dy * act'(x)`.
    pub(super) fn activate_backward_impl(
        &self,
        x: &CudaTensor,
        dy: &CudaTensor,
        act: Act,
    ) -> Result<CudaTensor> {
        if x.shape != dy.shape {
            return Err(shape_err(
                "activate_backward",
                format!("x {:?} and dy {:?}", x.shape, dy.shape),
            ));
        }
        let code = match act {
            Act::None => 0,
            Act::Gelu => 1,
            Act::Relu => 2,
        };
        let dx = self.empty(&x.shape)?;
        let n = x.numel();
        if n > 0 {
            self.launch(
                "act_bwd",
                Self::grid1d(n),
                (256, 1, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(dy.ptr()),
                    Arg::P(dx.ptr()),
                    Arg::L(n as i64),
                    Arg::I(code),
                ],
            )?;
        }
        Ok(dx)
    }

    /// `dx [rows, k] = dy [rows, n] @ w [n, k]`: column-major `dx^T (k x rows) = w^T dy^T`,
    /// where row-major `w` already is `w^T` column-major (no transposes).
    fn gemm_dx(&self, dy: u64, w: u64, dx: u64, rows: usize, n: usize, k: usize) -> Result<()> {
        let spec = GemmSpec {
            transa: false,
            transb: false,
            m: k as u64,
            n: rows as u64,
            k: n as u64,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            bias: false,
        };
        self.gemm(spec, w, dy, dx, None)
    }

    /// `dw [n, k] = dy^T [n, rows] @ x [rows, k]`: column-major `dw^T (k x n) = x^T dy`, with
    /// row-major `x` read as `x^T` and row-major `dy` (column-major `dy^T`) transposed by
    /// cuBLASLt.
    fn gemm_dw(&self, x: u64, dy: u64, dw: u64, rows: usize, n: usize, k: usize) -> Result<()> {
        let spec = GemmSpec {
            transa: false,
            transb: true,
            m: k as u64,
            n: n as u64,
            k: rows as u64,
            lda: k as i64,
            ldb: n as i64,
            ldc: k as i64,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            bias: false,
        };
        self.gemm(spec, x, dy, dw, None)
    }

    pub(super) fn linear_backward_input_impl(
        &self,
        dy: &CudaTensor,
        w: &CudaTensor,
    ) -> Result<CudaTensor> {
        let s = &dy.shape;
        let n = *s.last().unwrap_or(&0);
        if s.is_empty() || w.shape.len() != 2 || w.shape[0] != n {
            return Err(shape_err(
                "linear_backward_input",
                format!("dy {s:?} and weight {:?}", w.shape),
            ));
        }
        let k = w.shape[1];
        let rows = dy.numel() / n.max(1);
        let mut out = s[..s.len() - 1].to_vec();
        out.push(k);
        if rows == 0 || k == 0 {
            return self.empty(&out);
        }
        if n == 0 {
            return self.zeros_dev(&out);
        }
        let dx = self.empty(&out)?;
        self.gemm_dx(dy.ptr(), w.ptr(), dx.ptr(), rows, n, k)?;
        Ok(dx)
    }

    pub(super) fn linear_backward_weight_impl(
        &self,
        x: &CudaTensor,
        dy: &CudaTensor,
        bias: bool,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let (k, n) = (
            *x.shape.last().unwrap_or(&0),
            *dy.shape.last().unwrap_or(&0),
        );
        let rows = x.numel() / k.max(1);
        if x.shape.is_empty() || dy.shape.is_empty() || rows * n != dy.numel() {
            return Err(shape_err(
                "linear_backward_weight",
                format!("x {:?} and dy {:?}", x.shape, dy.shape),
            ));
        }
        let dw = if rows == 0 {
            self.zeros_dev(&[n, k])?
        } else {
            let dw = self.empty(&[n, k])?;
            if n * k > 0 {
                self.gemm_dw(x.ptr(), dy.ptr(), dw.ptr(), rows, n, k)?;
            }
            dw
        };
        let db = if bias {
            Some(if n == 0 {
                self.empty(&[0])?
            } else {
                self.sum_rows_impl(dy, n)?
            })
        } else {
            None
        };
        Ok((dw, db))
    }

    pub(super) fn layer_norm_backward_impl(
        &self,
        x: &CudaTensor,
        g: &CudaTensor,
        dy: &CudaTensor,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let c = *x.shape.last().unwrap_or(&0);
        if x.shape.is_empty() || g.shape != [c] || dy.shape != x.shape || c > i32::MAX as usize {
            return Err(shape_err(
                "layer_norm_backward",
                format!("x {:?}, g {:?}, dy {:?}", x.shape, g.shape, dy.shape),
            ));
        }
        let rows = x.numel() / c.max(1);
        if rows > i32::MAX as usize {
            return Err(shape_err("layer_norm_backward", format!("{rows} rows")));
        }
        let dx = self.empty(&x.shape)?;
        if rows == 0 || c == 0 {
            return Ok((dx, self.zeros_dev(&[c])?, self.zeros_dev(&[c])?));
        }
        let nblk = rows.min(LN_BWD_MAX_BLOCKS);
        let pg = self.scratch(nblk * c)?;
        let pb = self.scratch(nblk * c)?;
        self.launch(
            "layernorm_bwd",
            (nblk as u32, 1, 1),
            (128, 1, 1),
            0,
            &[
                Arg::P(x.ptr()),
                Arg::P(g.ptr()),
                Arg::P(dy.ptr()),
                Arg::P(dx.ptr()),
                Arg::P(pg.ptr()),
                Arg::P(pb.ptr()),
                Arg::I(rows as i32),
                Arg::I(c as i32),
                Arg::F(eps),
            ],
        )?;
        let dg = self.colsum_fin(pg.ptr(), nblk, c)?;
        let db = self.colsum_fin(pb.ptr(), nblk, c)?;
        Ok((dx, dg, db))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv2d_backward_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        dy: &CudaTensor,
        stride: usize,
        pad: usize,
        need_dx: bool,
        bias: bool,
    ) -> Result<(Option<CudaTensor>, CudaTensor, Option<CudaTensor>)> {
        let (s, ws) = (&x.shape, &w.shape);
        let bad = || {
            shape_err(
                "conv2d_backward",
                format!(
                    "x {s:?}, w {ws:?}, dy {:?}, stride {stride}, pad {pad}",
                    dy.shape
                ),
            )
        };
        if s.len() != 4
            || ws.len() != 4
            || ws[1] != s[3]
            || stride == 0
            || s[1] + 2 * pad < ws[2]
            || s[2] + 2 * pad < ws[3]
        {
            return Err(bad());
        }
        let (bn, h, wd, c) = (s[0], s[1], s[2], s[3]);
        let (co, kh, kw) = (ws[0], ws[2], ws[3]);
        let (ho, wo) = (
            (h + 2 * pad - kh) / stride + 1,
            (wd + 2 * pad - kw) / stride + 1,
        );
        if dy.shape != [bn, ho, wo, co] {
            return Err(bad());
        }
        let (m, kk) = (bn * ho * wo, c * kh * kw);
        // dW [co, kk] = dy^T [co, m] @ cols [m, kk] (cols = im2col(x), the forward's operand).
        let dw = if m == 0 || co * kk == 0 {
            self.zeros_dev(ws)?
        } else {
            let cols = self.empty(&[m, kk])?;
            self.launch(
                "im2col",
                Self::grid1d(cols.numel()),
                (256, 1, 1),
                0,
                &[
                    Arg::P(x.ptr()),
                    Arg::P(cols.ptr()),
                    Arg::I(bn as i32),
                    Arg::I(h as i32),
                    Arg::I(wd as i32),
                    Arg::I(c as i32),
                    Arg::I(kh as i32),
                    Arg::I(kw as i32),
                    Arg::I(stride as i32),
                    Arg::I(pad as i32),
                    Arg::I(ho as i32),
                    Arg::I(wo as i32),
                ],
            )?;
            let dw = self.empty(ws)?;
            self.gemm_dw(cols.ptr(), dy.ptr(), dw.ptr(), m, co, kk)?;
            dw
        };
        // dx = col2im(dy [m, co] @ W [co, kk]).
        let dx = if !need_dx {
            None
        } else if x.numel() == 0 {
            Some(self.empty(s)?)
        } else if m == 0 || co == 0 {
            Some(self.zeros_dev(s)?)
        } else {
            let dcols = self.empty(&[m, kk])?;
            self.gemm_dx(dy.ptr(), w.ptr(), dcols.ptr(), m, co, kk)?;
            let dx = self.empty(s)?;
            self.launch(
                "col2im",
                Self::grid1d(dx.numel()),
                (256, 1, 1),
                0,
                &[
                    Arg::P(dcols.ptr()),
                    Arg::P(dx.ptr()),
                    Arg::I(bn as i32),
                    Arg::I(h as i32),
                    Arg::I(wd as i32),
                    Arg::I(c as i32),
                    Arg::I(kh as i32),
                    Arg::I(kw as i32),
                    Arg::I(stride as i32),
                    Arg::I(pad as i32),
                    Arg::I(ho as i32),
                    Arg::I(wo as i32),
                ],
            )?;
            Some(dx)
        };
        let db = if !bias {
            None
        } else if co == 0 {
            Some(self.empty(&[0])?)
        } else {
            Some(self.sum_rows_impl(dy, co)?)
        };
        Ok((dx, dw, db))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        o: &CudaTensor,
        d_o: &CudaTensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
    ) -> Result<AttentionGrads<CudaTensor>> {
        let (sq, sk) = (&q.shape, &k.shape);
        if sq.len() != 3
            || sk.len() != 3
            || sk != &v.shape
            || &o.shape != sq
            || &d_o.shape != sq
            || sq[0] != sk[0]
            || sq[2] != sk[2]
            || heads == 0
            || sq[2] % heads != 0
        {
            return Err(shape_err(
                "attention_backward",
                format!(
                    "q {sq:?}, k {sk:?}, v {:?}, o {:?}, d_o {:?}, {heads} heads",
                    v.shape, o.shape, d_o.shape
                ),
            ));
        }
        let (b, lq, lk, c) = (sq[0], sq[1], sk[1], sq[2]);
        let d = c / heads;
        if d > ATTN_BWD_MAX_D || heads > 65535 || b > 65535 || lq > i32::MAX as usize {
            return Err(shape_err(
                "attention_backward",
                format!("head dim {d} (<= {ATTN_BWD_MAX_D}), {heads} heads, batch {b}"),
            ));
        }
        if lk == 0 && lq > 0 {
            return Err(shape_err(
                "attention_backward",
                "no keys to attend to".to_string(),
            ));
        }
        let grids = match &rel {
            Some(r) => {
                if r.q_grid.0 * r.q_grid.1 != lq
                    || r.k_grid.0 * r.k_grid.1 != lk
                    || r.rh.shape != [r.q_grid.0, r.k_grid.0, d]
                    || r.rw.shape != [r.q_grid.1, r.k_grid.1, d]
                {
                    return Err(shape_err(
                        "attention_backward",
                        format!(
                            "rel-pos {:?}/{:?} for grids {:?}/{:?}",
                            r.rh.shape, r.rw.shape, r.q_grid, r.k_grid
                        ),
                    ));
                }
                Some((r.q_grid, r.k_grid))
            }
            None => None,
        };
        // Nothing to attend from: every gradient is zero.
        if b * lq == 0 || d == 0 {
            return Ok(AttentionGrads {
                dq: self.zeros_dev(sq)?,
                dk: self.zeros_dev(sk)?,
                dv: self.zeros_dev(sk)?,
                drel: match &rel {
                    Some(r) => Some((self.zeros_dev(&r.rh.shape)?, self.zeros_dev(&r.rw.shape)?)),
                    None => None,
                },
            });
        }
        let ((qh, qw), (kh, kw)) = grids.unwrap_or(((0, 0), (0, 0)));
        let nr = if grids.is_some() { kh + kw } else { 0 };
        let rows = b * heads * lq;
        let lse = self.scratch(rows)?;
        let dr = self.scratch(rows)?;
        let smem_kv = attention_bwd_smem(d);
        // attn_bwd_dq accumulates its rows' dS sums per ky / kx in shared memory when the
        // device has room for them, else straight in gs (which must then start at zero).
        let smem_q_rel = smem_kv + 4 * ATTN_TILE * nr;
        let rel_smem = nr > 0 && smem_q_rel <= self.max_smem_optin.max(0) as usize;
        let smem_q = if rel_smem { smem_q_rel } else { smem_kv };
        // rq: the forward's bias terms per query row; gs: the dS row sums per ky / kx.
        let rq = self.scratch(rows * nr)?;
        let gs = self.scratch(rows * nr)?;
        let (rh, rw) = match &rel {
            Some(r) => (r.rh.ptr(), r.rw.ptr()),
            None => (0, 0),
        };
        if let Some(r) = &rel {
            self.launch(
                "attn_bwd_relq",
                (lq as u32, heads as u32, b as u32),
                (128, 1, 1),
                0,
                &[
                    Arg::P(q.ptr()),
                    Arg::P(r.rh.ptr()),
                    Arg::P(r.rw.ptr()),
                    Arg::P(rq.ptr()),
                    Arg::I(heads as i32),
                    Arg::I(lq as i32),
                    Arg::I(d as i32),
                    Arg::I(qw as i32),
                    Arg::I(kh as i32),
                    Arg::I(kw as i32),
                ],
            )?;
            if !rel_smem {
                self.memset0(gs.ptr(), rows * nr * 4)?;
            }
        }
        let has_rel = rel.is_some() as i32;
        let dq = self.empty(sq)?;
        let dk = self.empty(sk)?;
        let dv = self.empty(sk)?;
        let detail = |what: &str| {
            format!(
                "detail: {what} b{b} h{heads} Lq{lq} Lk{lk} d{d} rel{}",
                has_rel
            )
        };
        self.timed(
            || detail("attention_bwd_dq"),
            || {
                self.launch(
                    "attn_bwd_dq",
                    (lq.div_ceil(ATTN_TILE) as u32, heads as u32, b as u32),
                    (128, 1, 1),
                    smem_q as u32,
                    &[
                        Arg::P(q.ptr()),
                        Arg::P(k.ptr()),
                        Arg::P(v.ptr()),
                        Arg::P(o.ptr()),
                        Arg::P(d_o.ptr()),
                        Arg::P(dq.ptr()),
                        Arg::P(lse.ptr()),
                        Arg::P(dr.ptr()),
                        Arg::P(rq.ptr()),
                        Arg::P(gs.ptr()),
                        Arg::P(rh),
                        Arg::P(rw),
                        Arg::I(heads as i32),
                        Arg::I(lq as i32),
                        Arg::I(lk as i32),
                        Arg::I(d as i32),
                        Arg::F(scale),
                        Arg::I(qw as i32),
                        Arg::I(kh as i32),
                        Arg::I(kw as i32),
                        Arg::I(has_rel),
                        Arg::I(rel_smem as i32),
                    ],
                )
            },
        )?;
        self.timed(
            || detail("attention_bwd_dkv"),
            || {
                self.launch(
                    "attn_bwd_dkv",
                    (lk.div_ceil(ATTN_TILE) as u32, heads as u32, b as u32),
                    (128, 1, 1),
                    smem_kv as u32,
                    &[
                        Arg::P(q.ptr()),
                        Arg::P(k.ptr()),
                        Arg::P(v.ptr()),
                        Arg::P(d_o.ptr()),
                        Arg::P(dk.ptr()),
                        Arg::P(dv.ptr()),
                        Arg::P(lse.ptr()),
                        Arg::P(dr.ptr()),
                        Arg::P(rq.ptr()),
                        Arg::I(heads as i32),
                        Arg::I(lq as i32),
                        Arg::I(lk as i32),
                        Arg::I(d as i32),
                        Arg::F(scale),
                        Arg::I(qw as i32),
                        Arg::I(kh as i32),
                        Arg::I(kw as i32),
                        Arg::I(has_rel),
                    ],
                )
            },
        )?;
        let drel = match &rel {
            Some(_) => {
                // drh [qh, kh, d]: p = qy, r = ky, reduced over (b, h, qx).
                let drh =
                    self.rel_table_grad(&gs, q, (b, heads, lq, d, nr), (0, kh, qh, qw, qw, 1))?;
                // drw [qw, kw, d]: p = qx, r = kx, reduced over (b, h, qy).
                let drw =
                    self.rel_table_grad(&gs, q, (b, heads, lq, d, nr), (kh, kw, qw, qh, 1, qw))?;
                Some((
                    self.reshape_owned(drh, &[qh, kh, d])?,
                    self.reshape_owned(drw, &[qw, kw, d])?,
                ))
            }
            None => None,
        };
        Ok(AttentionGrads { dq, dk, dv, drel })
    }

    /// `out[p, r, :] = sum_{b, h, s} gs[(b, h, i), off + r] * q[b, i, h*d..]` with
    /// `i = p*sp + s*ss` (`s < ns`): split over CTAs into f32 partials, summed in order.
    #[allow(clippy::type_complexity)]
    fn rel_table_grad(
        &self,
        gs: &Scratch,
        q: &CudaTensor,
        (b, heads, lq, d, rcols): (usize, usize, usize, usize, usize),
        (off, nr, np, ns, sp, ss): (usize, usize, usize, usize, usize, usize),
    ) -> Result<CudaTensor> {
        let total = np * nr * d;
        if total == 0 {
            return self.empty(&[total]);
        }
        let n = b * heads * ns;
        if n > i32::MAX as usize || total > i32::MAX as usize {
            return Err(shape_err(
                "attention_backward",
                format!("rel-pos gradient of {n} rows x {total} outputs"),
            ));
        }
        let rblocks = nr.div_ceil(64);
        // About two waves of CTAs on a large GPU, each reducing at least 32 rows.
        let nsplit = (264usize.div_ceil(np * rblocks))
            .min(n.div_ceil(32))
            .clamp(1, 65535);
        let part = self.scratch(nsplit * total)?;
        self.launch(
            "attn_bwd_relgrad",
            (rblocks as u32, np as u32, nsplit as u32),
            (256, 1, 1),
            0,
            &[
                Arg::P(gs.ptr()),
                Arg::P(q.ptr()),
                Arg::P(part.ptr()),
                Arg::I(heads as i32),
                Arg::I(lq as i32),
                Arg::I(d as i32),
                Arg::I(rcols as i32),
                Arg::I(off as i32),
                Arg::I(nr as i32),
                Arg::I(np as i32),
                Arg::I(ns as i32),
                Arg::I(sp as i32),
                Arg::I(ss as i32),
                Arg::I(nsplit as i32),
                Arg::I(n as i32),
            ],
        )?;
        self.colsum_fin(part.ptr(), nsplit, total)
    }

    /// Same buffer, new shape (element counts match by construction).
    fn reshape_owned(&self, t: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        if shape.iter().product::<usize>() != t.numel() {
            return Err(shape_err(
                "reshape",
                format!("cannot view {:?} as {shape:?}", t.shape),
            ));
        }
        Ok(CudaTensor {
            shape: shape.to_vec(),
            buf: Arc::clone(&t.buf),
        })
    }
}

/// Dynamic shared memory of `attn_bwd_dkv`, and of `attn_bwd_dq` without its rel-pos
/// accumulator (`SMEM_BWD` of the kernel header): f32 Q, dO, K, V tiles with row stride
/// `Dp + 1`, one 64x65 dS tile, 256 words of row stats.
fn attention_bwd_smem(d: usize) -> usize {
    let dp = match d {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        65..=80 => 80,
        _ => 128,
    };
    4 * (4 * ATTN_TILE * (dp + 1) + ATTN_TILE * 65 + 256)
}
