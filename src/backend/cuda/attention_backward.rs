//! The CUDA attention backward: launchers of `kernels/attention_backward.cu` (the rel-pos
//! query terms, dq with the bias-gradient row sums, dk/dv, and the rel-pos table gradients).
//!
//! Shapes are checked here; outputs and f32 scratch come from the pool (see `backward.rs`).

use super::attention::AttnShape;
use super::backward::Scratch;
use super::params::unnamed;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::backend::{AttentionGrads, RelPos};
use crate::error::Result;

/// Head dims the attention backward kernels are built for (`kernels/attention_backward.cu`).
const ATTN_BWD_MAX_D: usize = 128;
/// Query/key tile of the attention backward kernels.
const ATTN_TILE: usize = 64;

/// The named arguments of one backward's three launches (`attn_bwd_relq`, `attn_bwd_dq`,
/// `attn_bwd_dkv`; `kernels/attention_backward.cu`'s header gives each parameter list, which
/// the methods below follow). Device addresses: the forward's tensors, the gradients written,
/// the f32 scratch and the rel-pos tables (0 without a bias).
struct AttnBwdLaunch {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    d_o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    lse: u64,
    dr: u64,
    rq: u64,
    gs: u64,
    rh: u64,
    rw: u64,
    shape: AttnShape,
    /// `attn_bwd_dq` accumulates the rel-pos row sums in shared memory (else in `gs`).
    rel_smem: bool,
}

impl AttnBwdLaunch {
    fn relq_args(&self) -> [Arg; 10] {
        unnamed(self.relq_named())
    }

    fn relq_named(&self) -> [(&'static str, Arg); 10] {
        let s = &self.shape;
        let (_, qw, kh, kw) = s.grid_args();
        [
            ("q", Arg::P(self.q)),
            ("rh", Arg::P(self.rh)),
            ("rw", Arg::P(self.rw)),
            ("rq", Arg::P(self.rq)),
            ("heads", Arg::I(s.heads as i32)),
            ("Lq", Arg::I(s.lq as i32)),
            ("d", Arg::I(s.d as i32)),
            ("qw", Arg::I(qw)),
            ("kh", Arg::I(kh)),
            ("kw", Arg::I(kw)),
        ]
    }

    fn dq_args(&self) -> Vec<Arg> {
        self.dq_named().into_iter().map(|(_, a)| a).collect()
    }

    fn dq_named(&self) -> Vec<(&'static str, Arg)> {
        let mut a = vec![
            ("q", Arg::P(self.q)),
            ("k", Arg::P(self.k)),
            ("v", Arg::P(self.v)),
            ("o", Arg::P(self.o)),
            ("dO", Arg::P(self.d_o)),
            ("dq", Arg::P(self.dq)),
            ("lse", Arg::P(self.lse)),
            ("dr", Arg::P(self.dr)),
            ("rq", Arg::P(self.rq)),
            ("gs", Arg::P(self.gs)),
            ("rh", Arg::P(self.rh)),
            ("rw", Arg::P(self.rw)),
        ];
        a.extend(self.dims());
        a.push(("rel_smem", Arg::I(self.rel_smem as i32)));
        a
    }

    fn dkv_args(&self) -> Vec<Arg> {
        self.dkv_named().into_iter().map(|(_, a)| a).collect()
    }

    fn dkv_named(&self) -> Vec<(&'static str, Arg)> {
        let mut a = vec![
            ("q", Arg::P(self.q)),
            ("k", Arg::P(self.k)),
            ("v", Arg::P(self.v)),
            ("dO", Arg::P(self.d_o)),
            ("dk", Arg::P(self.dk)),
            ("dv", Arg::P(self.dv)),
            ("lse", Arg::P(self.lse)),
            ("dr", Arg::P(self.dr)),
            ("rq", Arg::P(self.rq)),
        ];
        a.extend(self.dims());
        a
    }

    /// The scalars that follow the pointers in `attn_bwd_dq` and `attn_bwd_dkv`.
    fn dims(&self) -> [(&'static str, Arg); 9] {
        let s = &self.shape;
        let (_, qw, kh, kw) = s.grid_args();
        [
            ("heads", Arg::I(s.heads as i32)),
            ("Lq", Arg::I(s.lq as i32)),
            ("Lk", Arg::I(s.lk as i32)),
            ("d", Arg::I(s.d as i32)),
            ("scale", Arg::F(s.scale)),
            ("qw", Arg::I(qw)),
            ("kh", Arg::I(kh)),
            ("kw", Arg::I(kw)),
            ("has_rel", Arg::I(s.has_rel())),
        ]
    }
}

/// The named arguments of `attn_bwd_relgrad` (`kernels/attention_backward.cu`'s header): the
/// partial sums of one rel-pos table's gradient.
struct RelGradLaunch {
    gs: u64,
    q: u64,
    part: u64,
    heads: usize,
    lq: usize,
    d: usize,
    /// Row length of `gs` (`kh + kw`).
    rcols: usize,
    /// The table's first column in `gs`, its rows, and the (p, s) walk over query positions.
    off: usize,
    nr: usize,
    np: usize,
    ns: usize,
    sp: usize,
    ss: usize,
    nsplit: usize,
    /// Rows reduced: `b * heads * ns`.
    n: usize,
}

impl RelGradLaunch {
    fn args(&self) -> [Arg; 15] {
        unnamed(self.named())
    }

    fn named(&self) -> [(&'static str, Arg); 15] {
        let i = |x: usize| Arg::I(x as i32);
        [
            ("gs", Arg::P(self.gs)),
            ("q", Arg::P(self.q)),
            ("part", Arg::P(self.part)),
            ("heads", i(self.heads)),
            ("Lq", i(self.lq)),
            ("d", i(self.d)),
            ("R", i(self.rcols)),
            ("off", i(self.off)),
            ("nr", i(self.nr)),
            ("np", i(self.np)),
            ("ns", i(self.ns)),
            ("sp", i(self.sp)),
            ("ss", i(self.ss)),
            ("nsplit", i(self.nsplit)),
            ("N", i(self.n)),
        ]
    }
}

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
        let dq = self.empty("attention_backward", sq)?;
        let dk = self.empty("attention_backward", sk)?;
        let dv = self.empty("attention_backward", sk)?;
        let launch = AttnBwdLaunch {
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            o: o.ptr(),
            d_o: d_o.ptr(),
            dq: dq.ptr(),
            dk: dk.ptr(),
            dv: dv.ptr(),
            lse: lse.ptr(),
            dr: dr.ptr(),
            rq: rq.ptr(),
            gs: gs.ptr(),
            rh,
            rw,
            shape: AttnShape {
                b,
                heads,
                lq,
                lk,
                d,
                scale,
                grids,
            },
            rel_smem,
        };
        if rel.is_some() {
            self.launch(
                "attn_bwd_relq",
                (lq as u32, heads as u32, b as u32),
                (128, 1, 1),
                0,
                &launch.relq_args(),
            )?;
            if !rel_smem {
                self.memset0(gs.ptr(), rows * nr * 4)?;
            }
        }
        let detail = |what: &str| {
            format!(
                "detail: {what} b{b} h{heads} Lq{lq} Lk{lk} d{d} rel{}",
                rel.is_some() as u8
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
                    &launch.dq_args(),
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
                    &launch.dkv_args(),
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
            &RelGradLaunch {
                gs: gs.ptr(),
                q: q.ptr(),
                part: part.ptr(),
                heads,
                lq,
                d,
                rcols,
                off,
                nr,
                np,
                ns,
                sp,
                ss,
                nsplit,
                n,
            }
            .args(),
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

#[cfg(test)]
mod tests {
    use super::super::params::{kernel_params, listed};
    use super::*;

    #[test]
    fn launch_arguments_follow_the_kernel_parameter_lists() {
        let src = include_str!("../../../kernels/attention_backward.cu");
        let launch = AttnBwdLaunch {
            q: 1,
            k: 2,
            v: 3,
            o: 4,
            d_o: 5,
            dq: 6,
            dk: 7,
            dv: 8,
            lse: 9,
            dr: 10,
            rq: 11,
            gs: 12,
            rh: 13,
            rw: 14,
            shape: AttnShape {
                b: 2,
                heads: 2,
                lq: 6,
                lk: 6,
                d: 16,
                scale: 0.25,
                grids: Some(((2, 3), (2, 3))),
            },
            rel_smem: true,
        };
        assert_eq!(
            listed(&launch.relq_named()),
            kernel_params(src, "attn_bwd_relq_##S(")
        );
        assert_eq!(
            listed(&launch.dq_named()),
            kernel_params(src, "attn_bwd_dq_##S(")
        );
        assert_eq!(
            listed(&launch.dkv_named()),
            kernel_params(src, "attn_bwd_dkv_##S(")
        );
        let relgrad = RelGradLaunch {
            gs: 1,
            q: 2,
            part: 3,
            heads: 2,
            lq: 6,
            d: 16,
            rcols: 5,
            off: 0,
            nr: 2,
            np: 2,
            ns: 3,
            sp: 3,
            ss: 1,
            nsplit: 1,
            n: 12,
        };
        assert_eq!(
            listed(&relgrad.named()),
            kernel_params(src, "attn_bwd_relgrad_##S(")
        );
    }
}
