//! The encoder block's fused inference path: the math of `Block::forward_t` (SPEC sections
//! 1-3) with fewer passes over memory (DESIGN principle 6).
//!
//! - norm1 and the qkv projection run on the unpartitioned map; the attention reads its windows,
//!   and the padding tokens' projection, through `attention_qkv` with `Tokens::Windows`. No
//!   window partition or unpartition pass, and the projections skip the padding rows (4900 ->
//!   4096 rows per image in vit_b's windowed blocks at 1024).
//! - The SD-Trans depth branch reuses that normalised map and its projection (both per token, so
//!   equal in any layout) and attends along depth through `Tokens::Depth`, with no
//!   depth-major transposes.
//! - Residual adds ride in GEMM epilogues (`linear_residual`) or in the next LayerNorm
//!   (`add_layer_norm`); the adapters' skips and the MLP adapter's scale too.
//!
//! Padding tokens: SAM pads the *normalised* map with zeros, so their projection is the qkv
//! bias. Med-SA blocks pad the block input before norm1, and LayerNorm maps a zero row to its
//! bias `beta`, so their projection is `qkv(beta)`.
//!
//! The reference-compatible depth mode on a windowed block regroups window-partitioned tensors
//! with slices; only the plain path builds those, so such blocks take it.

use super::image_encoder::{Block, DepthSpec, MLP_ADAPTER_SCALE};
use crate::backend::{Act, Backend, RelPos, Tokens};
use crate::error::{Error, Result};
use crate::medsa::depth_branch::{depth_grid, DepthMode};
use crate::tensor::Tensor;

impl<B: Backend> Block<B> {
    /// Whether [`Block::forward_fused`] computes this block for `depth`.
    pub(crate) fn fusable(&self, depth: Option<DepthSpec>) -> bool {
        !matches!(
            (&self.depth_adapter, depth),
            (Some(_), Some(spec)) if spec.mode == DepthMode::Compat && self.cfg.window > 0
        )
    }

    /// `x` `[B, h, w, D]` -> `[B, h, w, D]`, the fused path (module docs).
    pub(crate) fn forward_fused(
        &self,
        be: &B,
        x: &B::Tensor,
        depth: Option<DepthSpec>,
    ) -> Result<B::Tensor> {
        let s = be.dims(x).to_vec();
        if s.len() != 4 {
            return Err(Error::shape(
                "encoder block",
                format!("{s:?} is not [B, h, w, C]"),
            ));
        }
        let (n, h, w, c) = (s[0], s[1], s[2], s[3]);
        let ws = self.cfg.window;
        let att = &self.attn;
        let heads = att.heads;
        let scale = ((c / heads) as f32).powf(-0.5);

        let xn = self.norm1.forward(be, x)?;
        let qkv = att.qkv.forward(be, &xn, Act::None)?;
        let o = if ws > 0 {
            let (rh, rw) = att.rel_tables(be, ws, ws)?;
            let rel = RelPos::shift_invariant(&rh, &rw, (ws, ws));
            let pad = self.pad_projection(be, c)?;
            be.attention_qkv(
                &qkv,
                Tokens::Windows { ws, pad: &pad },
                heads,
                scale,
                Some(rel),
            )?
        } else {
            let (rh, rw) = att.rel_tables(be, h, w)?;
            let rel = RelPos::shift_invariant(&rh, &rw, (h, w));
            let q3 = be.reshape(&qkv, &[n, h * w, 3 * c])?;
            let o = be.attention_qkv(&q3, Tokens::Sequences, heads, scale, Some(rel))?;
            be.reshape(&o, &[n, h, w, c])?
        };

        let xd = match (&self.depth_adapter, depth) {
            (Some(ad), Some(spec)) => {
                let (dh, dw) = depth_grid(spec.d);
                let (rh, rw) = att.rel_tables(be, dh, dw)?;
                let rel = RelPos::shift_invariant(&rh, &rw, (dh, dw));
                let od = be.attention_qkv(
                    &qkv,
                    Tokens::Depth { depth: spec.d },
                    heads,
                    scale,
                    Some(rel),
                )?;
                let od = att.proj.forward(be, &od, Act::None)?;
                Some(ad.forward(be, &od)?)
            }
            _ => None,
        };

        let n2 = &self.norm2;
        let (x1, xn2) = match &self.space_adapter {
            Some(sa) => {
                let a = att.proj.forward(be, &o, Act::None)?;
                let mut a = sa.forward(be, &a)?;
                if let Some(xd) = &xd {
                    a = be.add_scaled(&a, 1.0, xd, 1.0)?;
                }
                be.add_layer_norm(x, &a, 1.0, &n2.weight, &n2.bias, n2.eps)?
            }
            None => {
                let x1 =
                    be.linear_residual(&o, &att.proj.weight, att.proj.bias.as_ref(), x, 1.0)?;
                match &xd {
                    Some(xd) => be.add_layer_norm(&x1, xd, 1.0, &n2.weight, &n2.bias, n2.eps)?,
                    None => {
                        let xn2 = n2.forward(be, &x1)?;
                        (x1, xn2)
                    }
                }
            }
        };

        let m = self.lin1.forward(be, &xn2, Act::Gelu)?;
        let base = match &self.mlp_adapter {
            Some(ma) => ma.forward_residual(be, &xn2, &x1, MLP_ADAPTER_SCALE)?,
            None => x1,
        };
        be.linear_residual(&m, &self.lin2.weight, self.lin2.bias.as_ref(), &base, 1.0)
    }

    /// The qkv projection of a padding token `[3C]` (module docs).
    fn pad_projection(&self, be: &B, c: usize) -> Result<B::Tensor> {
        let qkv = &self.attn.qkv;
        if self.cfg.is_medsa() {
            let beta = be.reshape(&self.norm1.bias, &[1, c])?;
            let p = qkv.forward(be, &beta, Act::None)?;
            be.reshape(&p, &[3 * c])
        } else {
            match &qkv.bias {
                Some(b) => Ok(b.clone()),
                None => be.upload(&Tensor::zeros(&[3 * c])),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::sam::config::BlockConfig;
    use crate::sam::random::{random_checkpoint, Rng};
    use crate::sam::SamConfig;
    use crate::weights::WeightStore;

    /// A one-block encoder of width 32 (2 heads of 16) on a `grid` token map.
    fn block(bc: BlockConfig, grid: (usize, usize)) -> Block<Cpu> {
        let mut cfg = SamConfig::published("vit_b", true, true).unwrap();
        cfg.embed_dim = 32;
        cfg.heads = 2;
        cfg.mlp_dim = 64;
        cfg.pos_grid = grid;
        cfg.adapter_dim = Some(8);
        cfg.blocks = vec![bc];
        let mut ws = WeightStore::from_tensors("random", random_checkpoint(&cfg, 11));
        Block::load(&Cpu::new(), &mut ws, &cfg, 0).unwrap()
    }

    fn cfg(window: usize, space: bool, mlp: bool, depth: bool) -> BlockConfig {
        BlockConfig {
            window,
            space_adapter: space,
            mlp_adapter: mlp,
            depth_adapter: depth,
            medsa_rel_names: false,
        }
    }

    /// Fused and plain paths agree to f32 rounding: the fused path only reorders additions
    /// (residual adds folded into other ops), so the gap is a few ulps of the activations.
    fn check(bc: BlockConfig, grid: (usize, usize), batch: usize, depth: Option<DepthSpec>) {
        let be = Cpu::new();
        let blk = block(bc.clone(), grid);
        assert!(blk.fusable(depth));
        let x = Rng::new(3).tensor(&[batch, grid.0, grid.1, 32], 1.0);
        let a = blk.forward_fused(&be, &x, depth).unwrap();
        let b = blk.forward_t(&be, &x, depth).unwrap().0;
        assert_eq!(a.shape(), b.shape());
        let rms = (b.data().iter().map(|v| v * v).sum::<f32>() / b.data().len() as f32).sqrt();
        let err = a
            .data()
            .iter()
            .zip(b.data())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            err <= 1e-5 * rms.max(1.0),
            "{bc:?} grid {grid:?} depth {depth:?}: max |fused - plain| = {err} (rms {rms})"
        );
    }

    #[test]
    fn sam_windowed_block_with_padding() {
        check(cfg(3, false, false, false), (7, 5), 2, None);
    }

    #[test]
    fn sam_global_block() {
        check(cfg(0, false, false, false), (7, 5), 2, None);
    }

    #[test]
    fn medsa_windowed_block_pads_with_the_projected_norm_bias() {
        check(cfg(3, true, true, false), (7, 5), 2, None);
        check(cfg(4, true, true, false), (8, 8), 1, None);
    }

    #[test]
    fn medsa_depth_branch_per_token_and_compat_global() {
        let pt = DepthSpec {
            d: 3,
            mode: DepthMode::PerToken,
        };
        check(cfg(3, true, true, true), (7, 5), 6, Some(pt));
        // Depth adapter without a space adapter: the depth output joins through add_layer_norm.
        check(cfg(3, false, true, true), (7, 5), 6, Some(pt));
        let compat = DepthSpec {
            d: 2,
            mode: DepthMode::Compat,
        };
        check(cfg(0, true, false, true), (7, 5), 4, Some(compat));
        // A depth adapter present but a 2D batch: no depth branch.
        check(cfg(3, true, true, true), (7, 5), 2, None);
    }

    #[test]
    fn compat_depth_on_windowed_block_takes_the_plain_path() {
        let blk = block(cfg(3, true, true, true), (7, 5));
        let compat = DepthSpec {
            d: 2,
            mode: DepthMode::Compat,
        };
        assert!(!blk.fusable(Some(compat)));
        assert!(blk.fusable(Some(DepthSpec {
            d: 2,
            mode: DepthMode::PerToken
        })));
    }
}
