//! The CUDA attention backward: launchers of `kernels/attention_backward.cu` (the rel-pos
//! query terms, dq with the bias-gradient row sums, dk/dv, and the rel-pos table gradients).
//!
//! Shapes are checked here; outputs and f32 scratch come from the pool (see `backward.rs`).

use super::backward::Scratch;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::backend::{AttentionGrads, RelPos};
use crate::error::Result;

/// Head dims the attention backward kernels are built for (`kernels/attention_backward.cu`).
const ATTN_BWD_MAX_D: usize = 128;
/// Query/key tile of the attention backward kernels.
const ATTN_TILE: usize = 64;

impl Cuda {
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
                dq: self.zeros_dev("attention_backward", sq)?,
                dk: self.zeros_dev("attention_backward", sk)?,
                dv: self.zeros_dev("attention_backward", sk)?,
                drel: match &rel {
                    Some(r) => Some((
                        self.zeros_dev("attention_backward", &r.rh.shape)?,
                        self.zeros_dev("attention_backward_impl", &r.rw.shape)?,
                    )),
                    None => None,
                },
            });
        }
        let ((qh, qw), (kh, kw)) = grids.unwrap_or(((0, 0), (0, 0)));
        let nr = if grids.is_some() { kh + kw } else { 0 };
        let rows = b * heads * lq;
        let lse = self.scratch("attention_backward", rows)?;
        let dr = self.scratch("attention_backward", rows)?;
        let smem_kv = attention_bwd_smem(d);
        // attn_bwd_dq accumulates its rows' dS sums per ky / kx in shared memory when the
        // device has room for them, else straight in gs (which must then start at zero).
        let smem_q_rel = smem_kv + 4 * ATTN_TILE * nr;
        let rel_smem = nr > 0 && smem_q_rel <= self.max_smem_optin.max(0) as usize;
        let smem_q = if rel_smem { smem_q_rel } else { smem_kv };
        // rq: the forward's bias terms per query row; gs: the dS row sums per ky / kx.
        let rq = self.scratch("attention_backward", rows * nr)?;
        let gs = self.scratch("attention_backward", rows * nr)?;
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
        let dq = self.empty("attention_backward", sq)?;
        let dk = self.empty("attention_backward", sk)?;
        let dv = self.empty("attention_backward", sk)?;
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
            return self.empty("rel_table_grad", &[total]);
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
        let part = self.scratch("rel_table_grad", nsplit * total)?;
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
