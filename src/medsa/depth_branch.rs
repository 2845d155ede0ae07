//! SD-Trans: attention along the depth (slice) axis of a volume (SPEC section 3).
//!
//! A volume of `d` slices is a batch of `b*d` images, slice index fastest. For every spatial
//! token the branch takes the sequence of its `d` slices, normalises it with the block's `norm1`,
//! lays it out on the `depth_grid(d)` grid and runs the block's own attention (its rel-pos tables
//! resampled to that grid), then the depth adapter (no skip). Input and output are
//! `[b*d, h, w, C]`; which tensor goes in (the block input, or the window-partitioned one in the
//! reference-compatible mode) is the block's choice, see `sam::image_encoder`.

use crate::backend::Backend;
use crate::error::{Error, Result};

/// How the depth branch treats windowed blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DepthMode {
    /// Per-token semantics (our default): each spatial token attends over its own slices.
    #[default]
    PerToken,
    /// The public Med-SA code's regrouping of window-partitioned tensors, for adapters trained
    /// with it (mixes windows with slices when a block has more than one window).
    Compat,
}

/// The depth factorisation of the reference code: `(a, b)` with `a*b == d`, `a` the largest
/// divisor reached by its search from `floor(sqrt(d))`. `d = 1` gives `(1, 1)` (the reference
/// loops forever there).
pub fn depth_grid(d: usize) -> (usize, usize) {
    if d <= 1 {
        return (1, 1);
    }
    let mut a = (d as f64).sqrt().floor() as usize;
    let mut b = a + 1;
    loop {
        let p = a * b;
        if p == d {
            return (a, b);
        }
        if p < d {
            b += 1;
        } else {
            a -= 1;
        }
    }
}

/// `[b*d, h, w, C]` -> `[b*h*w, d, C]`: per spatial token, its slices in order.
pub fn to_depth_major<B: Backend>(be: &B, x: &B::Tensor, d: usize) -> Result<B::Tensor> {
    let s = be.dims(x).to_vec();
    if s.len() != 4 || d == 0 || s[0] % d != 0 {
        return Err(Error::shape(
            "depth_branch",
            format!("{s:?} is not a batch of {d}-slice volumes"),
        ));
    }
    let b = s[0] / d;
    let x = be.reshape(x, &[b, d, s[1] * s[2], s[3]])?;
    let x = be.permute(&x, &[0, 2, 1, 3])?;
    be.reshape(&x, &[b * s[1] * s[2], d, s[3]])
}

/// Inverse of [`to_depth_major`] for a map of spatial size `(h, w)`.
pub fn from_depth_major<B: Backend>(
    be: &B,
    x: &B::Tensor,
    d: usize,
    (h, w): (usize, usize),
) -> Result<B::Tensor> {
    let s = be.dims(x).to_vec();
    let c = *s.last().unwrap_or(&0);
    let n: usize = s.iter().product::<usize>() / (d * h * w * c.max(1));
    let x = be.reshape(x, &[n, h * w, d, c])?;
    let x = be.permute(&x, &[0, 2, 1, 3])?;
    be.reshape(&x, &[n * d, h, w, c])
}

#[cfg(test)]
mod tests {
    use super::depth_grid;

    #[test]
    fn depth_grid_matches_reference_factorisation() {
        for (d, g) in [
            (96, (8, 12)),
            (4, (1, 4)),
            (9, (1, 9)),
            (16, (2, 8)),
            (64, (4, 16)),
            (6, (2, 3)),
            (7, (1, 7)),
            (13, (1, 13)),
            (1, (1, 1)),
            (2, (1, 2)),
        ] {
            assert_eq!(depth_grid(d), g, "d = {d}");
        }
    }
}
