//! The CUDA gathers that move blocks of a tensor unchanged: `copy_block` (concat, narrow,
//! index_select0) and SAM's window partition and unpartition (the op-by-op path; the fused
//! path folds both into the attention kernel's indexing, see `attention.rs`). All three kernels
//! are in `kernels/elementwise.cu`.

use super::params::unnamed;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::error::Result;

/// One `copy_block` launch: for `o < outer`, `j < len`, `i < inner`, element
/// `(o * src_dim + src_off + j) * inner + i` of the source goes to
/// `(o * dst_dim + dst_off + j) * inner + i` of the destination.
#[derive(Clone, Copy, Debug)]
pub(super) struct Block {
    pub outer: usize,
    pub src_dim: usize,
    pub src_off: usize,
    pub dst_dim: usize,
    pub dst_off: usize,
    pub len: usize,
    pub inner: usize,
}

impl Block {
    /// The kernel's arguments with its parameter names.
    fn named(&self, x: u64, y: u64) -> [(&'static str, Arg); 9] {
        let i = |v: usize| Arg::I(v as i32);
        [
            ("x", Arg::P(x)),
            ("y", Arg::P(y)),
            ("outer", Arg::L(self.outer as i64)),
            ("src_dim", i(self.src_dim)),
            ("src_off", i(self.src_off)),
            ("dst_dim", i(self.dst_dim)),
            ("dst_off", i(self.dst_off)),
            ("len", i(self.len)),
            ("inner", Arg::L(self.inner as i64)),
        ]
    }
}

/// The geometry both window gathers take: a `[b, h, w, c]` map cut into `nh x nw` windows of
/// `ws x ws` tokens (zero padding past `h`, `w`).
#[derive(Clone, Copy, Debug)]
struct Windows {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
    nh: usize,
    nw: usize,
}

impl Windows {
    fn new(b: usize, (h, w): (usize, usize), c: usize, ws: usize) -> Self {
        Windows {
            b,
            h,
            w,
            c,
            ws,
            nh: h.div_ceil(ws),
            nw: w.div_ceil(ws),
        }
    }

    /// `[b * nh * nw, ws, ws, c]`.
    fn windowed(&self) -> [usize; 4] {
        [self.b * self.nh * self.nw, self.ws, self.ws, self.c]
    }

    /// The arguments of `window_partition` and `window_unpartition` (`x` their input, `y`
    /// their output) with the kernels' parameter names.
    fn named(&self, x: u64, y: u64) -> [(&'static str, Arg); 9] {
        let i = |v: usize| Arg::I(v as i32);
        [
            ("x", Arg::P(x)),
            ("y", Arg::P(y)),
            ("B", i(self.b)),
            ("H", i(self.h)),
            ("W", i(self.w)),
            ("C", i(self.c)),
            ("ws", i(self.ws)),
            ("nh", i(self.nh)),
            ("nw", i(self.nw)),
        ]
    }
}

impl Cuda {
    /// Copies `blk` of `x` into `y` (nothing for an empty block).
    pub(super) fn copy_block(&self, x: &CudaTensor, y: &CudaTensor, blk: Block) -> Result<()> {
        let n = blk.outer * blk.len * blk.inner;
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "copy_block",
            Self::grid1d(n),
            (256, 1, 1),
            0,
            &unnamed(blk.named(x.ptr(), y.ptr())),
        )
    }

    /// `Backend::window_partition`: SAM's zero padding and window split in one gather.
    pub(super) fn window_partition_impl(&self, x: &CudaTensor, ws: usize) -> Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 4 || ws == 0 {
            return Err(shape_err(
                "window_partition",
                format!("{s:?} with window {ws}"),
            ));
        }
        let g = Windows::new(s[0], (s[1], s[2]), s[3], ws);
        let y = self.empty("window_partition", &g.windowed())?;
        if y.numel() > 0 {
            self.launch(
                "window_partition",
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &unnamed(g.named(x.ptr(), y.ptr())),
            )?;
        }
        Ok(y)
    }

    /// `Backend::window_unpartition`: the inverse gather, cropping the padding.
    pub(super) fn window_unpartition_impl(
        &self,
        x: &CudaTensor,
        ws: usize,
        (h, w): (usize, usize),
    ) -> Result<CudaTensor> {
        let s = &x.shape;
        let per_image = h.div_ceil(ws.max(1)) * w.div_ceil(ws.max(1));
        if s.len() != 4
            || ws == 0
            || s[1] != ws
            || s[2] != ws
            || !s[0].is_multiple_of(per_image.max(1))
        {
            return Err(shape_err(
                "window_unpartition",
                format!("{s:?} to {h}x{w} with window {ws}"),
            ));
        }
        let g = Windows::new(s[0] / per_image.max(1), (h, w), s[3], ws);
        let y = self.empty("window_unpartition", &[g.b, h, w, g.c])?;
        if y.numel() > 0 {
            self.launch(
                "window_unpartition",
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &unnamed(g.named(x.ptr(), y.ptr())),
            )?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::super::params::{kernel_params, listed};
    use super::*;

    #[test]
    fn gather_arguments_follow_the_kernel_parameter_lists() {
        let src = include_str!("../../../kernels/elementwise.cu");
        let blk = Block {
            outer: 2,
            src_dim: 5,
            src_off: 1,
            dst_dim: 3,
            dst_off: 0,
            len: 3,
            inner: 4,
        };
        assert_eq!(
            listed(&blk.named(1, 2)),
            kernel_params(src, "copy_block_##S(")
        );
        let g = Windows::new(2, (9, 7), 3, 4);
        assert_eq!((g.nh, g.nw, g.windowed()), (3, 2, [12, 4, 4, 3]));
        for kernel in ["window_partition_##S(", "window_unpartition_##S("] {
            assert_eq!(
                listed(&g.named(1, 2)),
                kernel_params(src, kernel),
                "{kernel}"
            );
        }
    }
}
