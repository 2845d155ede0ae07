//! The CUDA LayerNorm launchers: `layer_norm` and the fused residual add + LayerNorm of
//! `kernels/layernorm.cu` (block-per-row and warp-per-row kernels), and the named arguments of
//! the backward kernel in `kernels/backward.cu` (its launcher is in `backward.rs`).

use super::params::unnamed;
use super::{shape_err, Arg, Cuda, CudaTensor};
use crate::error::Result;

/// The row geometry every LayerNorm kernel takes after its pointers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rows {
    pub rows: usize,
    pub c: usize,
    pub eps: f32,
}

impl Rows {
    fn named(&self) -> [(&'static str, Arg); 3] {
        [
            ("rows", Arg::I(self.rows as i32)),
            ("C", Arg::I(self.c as i32)),
            ("eps", Arg::F(self.eps)),
        ]
    }
}

/// The residual add before the norm in the `add_layernorm*` kernels: `s = a + beta * r`.
#[derive(Clone, Copy, Debug)]
struct Residual {
    r: u64,
    beta: f32,
    s: u64,
}

/// One forward LayerNorm launch: `y = LayerNorm(x) * g + b` (the `layernorm*` kernels), or of
/// `s = x + beta * r` with `add` (the `add_layernorm*` kernels, which name `x` `a`).
struct LnLaunch {
    x: u64,
    add: Option<Residual>,
    g: u64,
    b: u64,
    y: u64,
    rows: Rows,
}

impl LnLaunch {
    fn named(&self) -> Vec<(&'static str, Arg)> {
        let mut v = match self.add {
            None => vec![("x", Arg::P(self.x))],
            Some(Residual { r, beta, s }) => vec![
                ("a", Arg::P(self.x)),
                ("r", Arg::P(r)),
                ("beta", Arg::F(beta)),
                ("s", Arg::P(s)),
            ],
        };
        v.extend([
            ("g", Arg::P(self.g)),
            ("b", Arg::P(self.b)),
            ("y", Arg::P(self.y)),
        ]);
        v.extend(self.rows.named());
        v
    }
}

/// One `layernorm_bwd` launch: `dx` and the per-block partial sums `pg`, `pb` of dg, db.
pub(super) struct LnBwdLaunch {
    pub x: u64,
    pub g: u64,
    pub dy: u64,
    pub dx: u64,
    pub pg: u64,
    pub pb: u64,
    pub rows: Rows,
}

impl LnBwdLaunch {
    /// The kernel's arguments, in order.
    pub fn args(&self) -> [Arg; 9] {
        unnamed(self.named())
    }

    fn named(&self) -> [(&'static str, Arg); 9] {
        let [r, c, e] = self.rows.named();
        [
            ("x", Arg::P(self.x)),
            ("g", Arg::P(self.g)),
            ("dy", Arg::P(self.dy)),
            ("dx", Arg::P(self.dx)),
            ("pg", Arg::P(self.pg)),
            ("pb", Arg::P(self.pb)),
            r,
            c,
            e,
        ]
    }
}

impl Cuda {
    /// Whether rows of `c` elements in `ts` suit the warp-per-row LayerNorm kernels
    /// (`kernels/layernorm.cu`): the row fits a warp's registers (at most 2048 elements, a
    /// whole number of 16-byte vectors) and every buffer is 16-byte aligned (the pool's blocks
    /// are). Otherwise the block-per-row kernels run.
    fn layernorm_warp_fits(&self, c: usize, ts: &[&CudaTensor]) -> bool {
        let vec = 16 / self.precision.size();
        c.is_multiple_of(vec) && c <= 2048 && ts.iter().all(|t| t.ptr().is_multiple_of(16))
    }

    /// Launches `ln` on the block-per-row kernel, or on the warp-per-row one with `warp`.
    fn launch_layernorm(&self, ln: &LnLaunch, warp: bool) -> Result<()> {
        let kernel = match (ln.add.is_some(), warp) {
            (false, false) => "layernorm",
            (false, true) => "layernorm_warp",
            (true, false) => "add_layernorm",
            (true, true) => "add_layernorm_warp",
        };
        // The warp kernels normalise four rows per 128-thread block.
        let grid = if warp {
            ln.rows.rows.div_ceil(4)
        } else {
            ln.rows.rows
        };
        let args: Vec<Arg> = ln.named().into_iter().map(|(_, a)| a).collect();
        self.launch(kernel, (grid as u32, 1, 1), (128, 1, 1), 0, &args)
    }

    /// [`Backend::layer_norm`](crate::backend::Backend::layer_norm) on this device.
    pub(super) fn layer_norm_impl(
        &self,
        x: &CudaTensor,
        g: &CudaTensor,
        b: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let c = *x.shape.last().unwrap_or(&0);
        if g.shape != [c] || b.shape != [c] {
            return Err(shape_err(
                "layer_norm",
                format!("x {:?}, g {:?}, b {:?}", x.shape, g.shape, b.shape),
            ));
        }
        let y = self.empty("layer_norm", &x.shape)?;
        let rows = x.numel() / c.max(1);
        if rows > 0 && c > 0 {
            // The warp-per-row kernel is opt-in (`RunOptions::layernorm_rows`) until a device
            // run has verified it; the block-per-row kernel is the verified default.
            let warp = self.layernorm_rows && self.layernorm_warp_fits(c, &[x, g, b, &y]);
            let ln = LnLaunch {
                x: x.ptr(),
                add: None,
                g: g.ptr(),
                b: b.ptr(),
                y: y.ptr(),
                rows: Rows { rows, c, eps },
            };
            self.launch_layernorm(&ln, warp)?;
        }
        Ok(y)
    }

    /// [`Backend::add_layer_norm`](crate::backend::Backend::add_layer_norm) on this device.
    pub(super) fn add_layer_norm_impl(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        beta: f32,
        g: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let c = *a.shape.last().unwrap_or(&0);
        if a.shape != b.shape || g.shape != [c] || bias.shape != [c] {
            return Err(shape_err(
                "add_layer_norm",
                format!(
                    "a {:?}, b {:?}, g {:?}, bias {:?}",
                    a.shape, b.shape, g.shape, bias.shape
                ),
            ));
        }
        let s = self.empty("add_layer_norm", &a.shape)?;
        let y = self.empty("add_layer_norm", &a.shape)?;
        let rows = a.numel() / c.max(1);
        if rows > 0 && c > 0 {
            let warp = self.layernorm_warp_fits(c, &[a, b, &s, g, bias, &y]);
            let ln = LnLaunch {
                x: a.ptr(),
                add: Some(Residual {
                    r: b.ptr(),
                    beta,
                    s: s.ptr(),
                }),
                g: g.ptr(),
                b: bias.ptr(),
                y: y.ptr(),
                rows: Rows { rows, c, eps },
            };
            self.launch_layernorm(&ln, warp)?;
        }
        Ok((s, y))
    }
}

#[cfg(test)]
mod tests {
    use super::super::params::{kernel_params, listed};
    use super::*;

    #[test]
    fn layernorm_arguments_follow_the_kernel_parameter_lists() {
        let src = include_str!("../../../kernels/layernorm.cu");
        let rows = Rows {
            rows: 3,
            c: 8,
            eps: 1e-6,
        };
        let ln = LnLaunch {
            x: 1,
            add: None,
            g: 2,
            b: 3,
            y: 4,
            rows,
        };
        let add = LnLaunch {
            add: Some(Residual {
                r: 5,
                beta: 0.5,
                s: 6,
            }),
            ..ln
        };
        for t in ["f32", "bf16"] {
            for warp in ["", "_warp"] {
                let plain = format!(" layernorm{warp}_{t}(");
                assert_eq!(listed(&ln.named()), kernel_params(src, &plain), "{plain}");
                let fused = format!("add_layernorm{warp}_{t}(");
                assert_eq!(listed(&add.named()), kernel_params(src, &fused), "{fused}");
            }
        }
        let bwd = LnBwdLaunch {
            x: 1,
            g: 2,
            dy: 3,
            dx: 4,
            pg: 5,
            pb: 6,
            rows,
        };
        assert_eq!(
            listed(&bwd.named()),
            kernel_params(
                include_str!("../../../kernels/backward.cu"),
                "layernorm_bwd_##S("
            )
        );
    }
}
