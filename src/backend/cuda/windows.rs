//! The CUDA window partition and unpartition of SAM's windowed blocks (the op-by-op path; the
//! fused path folds both into the attention kernel's indexing, see `attention.rs`).

use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::error::Result;

impl Cuda {
    /// `Backend::window_partition`: SAM's zero padding and window split in one gather.
    pub(super) fn window_partition_impl(&self, x: &CudaTensor, ws: usize) -> Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 4 || ws == 0 {
            return Err(shape_err(
                "window_partition",
                format!("{s:?} with window {ws}"),
            ));
        }
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let y = self.empty("window_partition", &[b * nh * nw, ws, ws, c])?;
        let args = [
            Arg::P(x.ptr()),
            Arg::P(y.ptr()),
            Arg::I(b as i32),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::I(ws as i32),
            Arg::I(nh as i32),
            Arg::I(nw as i32),
        ];
        if y.numel() > 0 {
            self.launch(
                "window_partition",
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &args,
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
        let (nh, nw) = (h.div_ceil(ws.max(1)), w.div_ceil(ws.max(1)));
        if s.len() != 4
            || ws == 0
            || s[1] != ws
            || s[2] != ws
            || !s[0].is_multiple_of((nh * nw).max(1))
        {
            return Err(shape_err(
                "window_unpartition",
                format!("{s:?} to {h}x{w} with window {ws}"),
            ));
        }
        let (b, c) = (s[0] / (nh * nw), s[3]);
        let y = self.empty("window_unpartition", &[b, h, w, c])?;
        let args = [
            Arg::P(x.ptr()),
            Arg::P(y.ptr()),
            Arg::I(b as i32),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::I(ws as i32),
            Arg::I(nh as i32),
            Arg::I(nw as i32),
        ];
        if y.numel() > 0 {
            self.launch(
                "window_unpartition",
                Self::grid1d(y.numel()),
                (256, 1, 1),
                0,
                &args,
            )?;
        }
        Ok(y)
    }
}
