//! Attention launchers: shape checks of the attention ops and the one launcher of
//! `kernels/attention.cu` (its token-row maps: plain sequences, windows of a map with padding,
//! depth sequences of a slice-major volume).

use super::params::unnamed;
use super::{shape_err, Arg, Cuda, CudaTensor, Precision};
use crate::backend::{fused, RelPos};
use crate::error::Result;

/// Head dims the attention kernel is built for (`kernels/attention.cu`).
const ATTN_MAX_D: usize = 128;

/// `opts` bits of `kernels/attention.cu`: rel-pos terms with mma (shift-invariant tables).
const ATT_OPT_REL_MMA: i32 = 1;
/// `opts` bits of `kernels/attention.cu`: skip query m-tiles and key groups past the ends.
const ATT_OPT_TRIM: i32 = 2;
/// `opts` bits of `kernels/attention.cu`: second K and V buffers, each tile fetched a tile ahead.
const ATT_OPT_PREFETCH: i32 = 4;

impl Cuda {
    /// [`Backend::attention`](crate::backend::Backend::attention) on this device.
    pub(super) fn attention_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
    ) -> Result<CudaTensor> {
        let (sq, sk) = (&q.shape, &k.shape);
        if sq.len() != 3
            || sk.len() != 3
            || sk != &v.shape
            || sq[0] != sk[0]
            || sq[2] != sk[2]
            || heads == 0
            || sq[2] % heads != 0
        {
            return Err(shape_err(
                "attention",
                format!("q {sq:?}, k {sk:?}, v {:?}, {heads} heads", v.shape),
            ));
        }
        let io = AttnIo {
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            ld: sq[2],
        };
        let out = [sq[0], sq[1], sq[2]];
        let seqs = (sq[0], sq[1], sk[1]);
        self.attention_raw(
            io,
            seqs,
            heads,
            sq[2] / heads,
            scale,
            rel,
            TokenMap::Plain,
            &out,
        )
    }

    /// [`Backend::attention_qkv`](crate::backend::Backend::attention_qkv) on this device.
    pub(super) fn attention_qkv_impl(
        &self,
        qkv: &CudaTensor,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
    ) -> Result<CudaTensor> {
        let s = &qkv.shape;
        if s.len() != 3
            || !s[2].is_multiple_of(3)
            || heads == 0
            || !(s[2] / 3).is_multiple_of(heads)
        {
            return Err(shape_err(
                "attention_qkv",
                format!("{s:?} with {heads} heads"),
            ));
        }
        let dim = s[2] / 3;
        let io = AttnIo::packed(qkv.ptr(), s[2], self.precision);
        let out = [s[0], s[1], dim];
        let seqs = (s[0], s[1], s[1]);
        self.attention_raw(
            io,
            seqs,
            heads,
            dim / heads,
            scale,
            rel,
            TokenMap::Plain,
            &out,
        )
    }

    /// [`Backend::attention_qkv`](crate::backend::Backend::attention_qkv) with
    /// [`Tokens::Windows`](crate::backend::Tokens::Windows) on this device.
    pub(super) fn attention_qkv_windowed_impl(
        &self,
        qkv: &CudaTensor,
        pad: &CudaTensor,
        ws: usize,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
    ) -> Result<CudaTensor> {
        let (n, h, w, c3) = fused::windowed_dims(&qkv.shape, pad.numel(), ws, heads)?;
        let dim = c3 / 3;
        let io = AttnIo::packed(qkv.ptr(), c3, self.precision);
        let map = TokenMap::Windows {
            ws,
            h,
            w,
            pads: AttnIo::packed(pad.ptr(), c3, self.precision).qkv(),
        };
        let windows = n * h.div_ceil(ws) * w.div_ceil(ws);
        let seqs = (windows, ws * ws, ws * ws);
        self.attention_raw(
            io,
            seqs,
            heads,
            dim / heads,
            scale,
            rel,
            map,
            &[n, h, w, dim],
        )
    }

    /// [`Backend::attention_qkv`](crate::backend::Backend::attention_qkv) with
    /// [`Tokens::Depth`](crate::backend::Tokens::Depth) on this device.
    pub(super) fn attention_qkv_depth_impl(
        &self,
        qkv: &CudaTensor,
        depth: usize,
        heads: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
    ) -> Result<CudaTensor> {
        let (n, h, w, c3) = fused::depth_dims(&qkv.shape, depth, heads)?;
        let dim = c3 / 3;
        let io = AttnIo::packed(qkv.ptr(), c3, self.precision);
        let p = h * w;
        let seqs = ((n / depth) * p, depth, depth);
        let map = TokenMap::Depth { p };
        self.attention_raw(
            io,
            seqs,
            heads,
            dim / heads,
            scale,
            rel,
            map,
            &[n, h, w, dim],
        )
    }
}

pub use crate::backend::options::AttentionOptions;

impl Cuda {
    /// The options that take effect for self-attention with head dim `d` over a `grid x grid`
    /// map with its rel-pos bias (the encoder's global blocks): those asked for, where this
    /// precision, head dim and card run them.
    pub fn attention_options_for(&self, d: usize, grid: usize) -> AttentionOptions {
        let tc = self.tensor_core_attention(d);
        AttentionOptions {
            q128: self.q128_applies(d, true, grid, grid),
            rel_mma: tc && self.attn.rel_mma,
            trim: tc && self.attn.trim,
            exp2: tc && self.attn.exp2,
            prefetch: tc && self.attn.prefetch,
        }
    }

    /// Whether attention with head dim `d` takes the tensor-core path (the one the options act on).
    fn tensor_core_attention(&self, d: usize) -> bool {
        self.precision == Precision::Bf16 && (d == 64 || d == 80)
    }

    fn q128_applies(&self, d: usize, rel: bool, kh: usize, kw: usize) -> bool {
        self.attn.q128
            && self.precision == Precision::Bf16
            && d == 64
            && attention_smem_q128(rel, kh, kw) as i64 <= self.max_smem_optin as i64
    }
}

/// Token-row mapping of the attention kernel (`kernels/attention.cu`, "Token rows").
#[derive(Clone, Copy, Debug)]
enum TokenMap {
    /// `[B, L]` sequences.
    Plain,
    /// `ws x ws` windows of `[N, h, w]` maps, padding tokens read from pad rows `(q, k, v)`.
    Windows {
        ws: usize,
        h: usize,
        w: usize,
        pads: (u64, u64, u64),
    },
    /// Depth sequences of a slice-major `[V * D, P]` token layout (`p` tokens per slice).
    Depth { p: usize },
}

/// Device addresses of q, k, v (token rows with row stride `ld` elements).
struct AttnIo {
    q: u64,
    k: u64,
    v: u64,
    ld: usize,
}

impl AttnIo {
    /// q, k and v as the column thirds of packed `[.., 3 * dim]` rows starting at `base` (a qkv
    /// projection, or one pad row), read in place with row stride `3 * dim`.
    fn packed(base: u64, c3: usize, precision: Precision) -> Self {
        let third = (c3 / 3 * precision.size()) as u64;
        AttnIo {
            q: base,
            k: base + third,
            v: base + 2 * third,
            ld: c3,
        }
    }

    /// The three addresses.
    fn qkv(&self) -> (u64, u64, u64) {
        (self.q, self.k, self.v)
    }
}

/// One attention problem as the kernels of `kernels/attention.cu` and
/// `kernels/attention_backward.cu` see it (their headers' "Math"): `b` sequences of `lq`
/// queries and `lk` keys, `heads` heads of dim `d`, the score scale, the rel-pos grids when
/// there is a bias.
#[derive(Clone, Copy, Debug)]
pub(super) struct AttnShape {
    pub b: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub scale: f32,
    /// Query and key grids `(rows, cols)` of the rel-pos bias; `None` without one.
    pub grids: Option<((usize, usize), (usize, usize))>,
}

impl AttnShape {
    /// `(qh, qw, kh, kw)` as the kernels take them (zeros without a bias).
    pub fn grid_args(&self) -> (i32, i32, i32, i32) {
        let ((qh, qw), (kh, kw)) = self.grids.unwrap_or(((0, 0), (0, 0)));
        (qh as i32, qw as i32, kh as i32, kw as i32)
    }

    pub fn has_rel(&self) -> i32 {
        self.grids.is_some() as i32
    }
}

/// The named arguments of one `attention*` kernel launch family; [`AttnLaunch::args`] lays
/// them out in the entry points' parameter order (`kernels/attention.cu`'s header). The kernel
/// keeps its scalar parameter list on purpose: a by-value struct parameter was tried and
/// changes nvcc's code for these kernels (spills in `attention_exp2_bf16` on sm_80 and
/// sm_90a), so the struct lives on this side only.
struct AttnLaunch {
    io: AttnIo,
    o: u64,
    /// The rel-pos tables `rh`, `rw` (0 without a bias).
    rel: (u64, u64),
    shape: AttnShape,
    map: TokenMap,
    /// `ATT_OPT_*` bits.
    opts: i32,
}

impl AttnLaunch {
    /// The kernels' 28 arguments for the launch whose first sequence is `b_off`.
    fn args(&self, b_off: usize) -> [Arg; 28] {
        unnamed(self.named_args(b_off))
    }

    /// [`AttnLaunch::args`] with the kernels' parameter names (a test holds them to the
    /// parameter list in `kernels/attention.cu`).
    fn named_args(&self, b_off: usize) -> [(&'static str, Arg); 28] {
        let s = &self.shape;
        let (qh, qw, kh, kw) = s.grid_args();
        let (code, ma, mb, mc, md, pads) = match self.map {
            TokenMap::Plain => (0, 0, 0, 0, 0, (0, 0, 0)),
            TokenMap::Windows { ws, h, w, pads } => (1, ws, h, w, w.div_ceil(ws), pads),
            TokenMap::Depth { p } => (2, p, 0, 0, 0, (0, 0, 0)),
        };
        [
            ("q", Arg::P(self.io.q)),
            ("k", Arg::P(self.io.k)),
            ("v", Arg::P(self.io.v)),
            ("o", Arg::P(self.o)),
            ("rh", Arg::P(self.rel.0)),
            ("rw", Arg::P(self.rel.1)),
            ("B", Arg::I(s.b as i32)),
            ("heads", Arg::I(s.heads as i32)),
            ("Lq", Arg::I(s.lq as i32)),
            ("Lk", Arg::I(s.lk as i32)),
            ("d", Arg::I(s.d as i32)),
            ("scale", Arg::F(s.scale)),
            ("qh", Arg::I(qh)),
            ("qw", Arg::I(qw)),
            ("kh", Arg::I(kh)),
            ("kw", Arg::I(kw)),
            ("has_rel", Arg::I(s.has_rel())),
            ("ldi", Arg::I(self.io.ld as i32)),
            ("map", Arg::I(code)),
            ("ma", Arg::I(ma as i32)),
            ("mb", Arg::I(mb as i32)),
            ("mc", Arg::I(mc as i32)),
            ("md", Arg::I(md as i32)),
            ("b_off", Arg::I(b_off as i32)),
            ("pad_q", Arg::P(pads.0)),
            ("pad_k", Arg::P(pads.1)),
            ("pad_v", Arg::P(pads.2)),
            ("opts", Arg::I(self.opts)),
        ]
    }
}

impl Cuda {
    /// Launches `attention` over `b` sequences of `lq` queries and `lk` keys whose token rows
    /// `map` places; the output (row stride `heads * d`) has shape `out`.
    #[allow(clippy::too_many_arguments)]
    fn attention_raw(
        &self,
        io: AttnIo,
        (b, lq, lk): (usize, usize, usize),
        heads: usize,
        d: usize,
        scale: f32,
        rel: Option<RelPos<'_, CudaTensor>>,
        map: TokenMap,
        out: &[usize],
    ) -> Result<CudaTensor> {
        if d > ATTN_MAX_D {
            return Err(shape_err(
                "attention",
                format!("head dim {d} > {ATTN_MAX_D}"),
            ));
        }
        let (rh, rw, grids) = match &rel {
            Some(r) => {
                if r.q_grid.0 * r.q_grid.1 != lq
                    || r.k_grid.0 * r.k_grid.1 != lk
                    || r.rh.shape != [r.q_grid.0, r.k_grid.0, d]
                    || r.rw.shape != [r.q_grid.1, r.k_grid.1, d]
                {
                    return Err(shape_err(
                        "attention",
                        format!(
                            "rel-pos {:?}/{:?} for grids {:?}/{:?}",
                            r.rh.shape, r.rw.shape, r.q_grid, r.k_grid
                        ),
                    ));
                }
                (r.rh.ptr(), r.rw.ptr(), Some((r.q_grid, r.k_grid)))
            }
            None => (0, 0, None),
        };
        let ((_, _), (kh, kw)) = grids.unwrap_or(((0, 0), (0, 0)));
        // The kernel's opts (kernels/attention.cu): REL_MMA when the tables depend on the offset
        // only (the tensor-core path then takes the rel-pos terms from the 2k - 1 distinct rows
        // with mma), TRIM to skip the work of query and key groups past the sequence ends.
        let rel_mma = rel
            .as_ref()
            .is_some_and(|r| r.shift_invariant && r.q_grid == r.k_grid && self.attn.rel_mma);
        let opts = ATT_OPT_REL_MMA * rel_mma as i32
            + ATT_OPT_TRIM * self.attn.trim as i32
            + ATT_OPT_PREFETCH * self.attn.prefetch as i32;
        let o = self.empty("attention_raw", out)?;
        if b * lq == 0 {
            return Ok(o);
        }
        // The 128-query variant when chosen, built (bf16, d = 64) and given enough shared memory;
        // the exp2 entries of either on the tensor-core path.
        let q128 = self.q128_applies(d, rel.is_some(), kh, kw);
        let exp2 = self.attn.exp2 && self.tensor_core_attention(d);
        let (rows, smem) = if q128 {
            (128, attention_smem_q128(rel.is_some(), kh, kw))
        } else {
            let prefetch = self.attn.prefetch;
            (
                64,
                attention_smem(self.precision, d, rel.is_some(), kh, kw, prefetch),
            )
        };
        let kernel = match (q128, exp2) {
            (false, false) => "attention",
            (false, true) => "attention_exp2",
            (true, false) => "attention_q128",
            (true, true) => "attention_q128_exp2",
        };
        let detail = || {
            format!(
                "detail: attention b{b} h{heads} Lq{lq} Lk{lk} d{d} rel{} opts{opts}{}",
                rel.is_some() as u8,
                if exp2 { " exp2" } else { "" }
            )
        };
        let launch = AttnLaunch {
            io,
            o: o.ptr(),
            rel: (rh, rw),
            shape: AttnShape {
                b,
                heads,
                lq,
                lk,
                d,
                scale,
                grids,
            },
            map,
            opts,
        };
        self.timed(detail, || {
            // grid.z is at most 65535: larger batches of sequences take several launches.
            for b_off in (0..b).step_by(65535) {
                let nb = (b - b_off).min(65535);
                self.launch(
                    kernel,
                    (lq.div_ceil(rows) as u32, heads as u32, nb as u32),
                    (128, 1, 1),
                    smem as u32,
                    &launch.args(b_off),
                )?;
            }
            Ok(())
        })?;
        Ok(o)
    }
}

/// Dynamic shared memory of `attention`, the formula of `kernels/attention.cu`'s header: the
/// bf16 tensor-core path (d = 64 or 80) stages bf16 Q/K/V tiles; the SIMT path stages f32 tiles
/// padded to the compile-time head dim; both keep `64 x (kh + kw)` rel-pos terms in f32.
/// `prefetch` (`ATT_OPT_PREFETCH`) adds the tensor-core path's second V buffer (its second K
/// buffer is the Q tile); the SIMT path ignores the option.
fn attention_smem(
    precision: Precision,
    d: usize,
    rel: bool,
    kh: usize,
    kw: usize,
    prefetch: bool,
) -> usize {
    let r = if rel { kh + kw } else { 0 };
    if precision == Precision::Bf16 && (d == 64 || d == 80) {
        // Bias rows padded by one element each (bank-conflict-free reads).
        let rp = if rel { r + 2 } else { 0 };
        let v2 = if prefetch { 2 * 64 * (d + 8) } else { 0 };
        return 2 * (2 * 64 * (d + 8) + d * 72) + 4 * 64 * rp + v2;
    }
    let dp = match d {
        0..=16 => 16,
        17..=32 => 32,
        33..=64 => 64,
        65..=80 => 80,
        _ => 128,
    };
    4 * (64 * (dp + 1) * 2 + 64 * dp + 64 * 65 + 64 * r)
}

/// Dynamic shared memory of `attention_q128` (d = 64; `SMEM_TC2` of `kernels/attention.cu`'s
/// header): bf16 Q [128][72], K and V [64][72], and `128 x (kh + kw + 2)` f32 rel-pos terms.
fn attention_smem_q128(rel: bool, kh: usize, kw: usize) -> usize {
    let rp = if rel { kh + kw + 2 } else { 0 };
    2 * (128 + 2 * 64) * 72 + 4 * 128 * rp
}

#[cfg(test)]
mod tests {
    use super::super::params::{kernel_params, listed};
    use super::*;

    #[test]
    fn launch_arguments_follow_the_kernel_parameter_list() {
        let want = kernel_params(
            include_str!("../../../kernels/attention.cu"),
            "#define ATT_PARAMS(T)",
        );
        assert_eq!(want.len(), 28, "{want:?}");
        let launch = AttnLaunch {
            io: AttnIo {
                q: 1,
                k: 2,
                v: 3,
                ld: 4,
            },
            o: 5,
            rel: (6, 7),
            shape: AttnShape {
                b: 8,
                heads: 2,
                lq: 6,
                lk: 6,
                d: 16,
                scale: 0.25,
                grids: Some(((2, 3), (2, 3))),
            },
            map: TokenMap::Windows {
                ws: 2,
                h: 3,
                w: 4,
                pads: (9, 10, 11),
            },
            opts: ATT_OPT_TRIM,
        };
        assert_eq!(listed(&launch.named_args(0)), want);
    }
}
