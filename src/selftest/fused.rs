//! The fused inference ops against the CPU reference, which runs them as the plain op
//! sequences of `backend::fused` (part of [`super::ops`]). Shapes cover the kernels' index
//! maps: windows with bottom/right padding on one or both axes and without, vit_b's 64x64 map
//! in 14x14 windows (padded to 70x70), head dims on the tensor-core path (64, 80) and on the
//! SIMT path (16), depth sequences shorter than a tile, and a residual LayerNorm wider than
//! the kernel's register cache.

use super::{pair, pair_n, rel_pos, rel_table, si_tag, Check, Tolerance};
use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Tokens};
use crate::medsa::depth_branch::depth_grid;
use crate::sam::random::Rng;

/// Every fused op on random inputs.
pub fn fused_ops<B: Backend>(be: &B, tol: Tolerance) -> Vec<Check> {
    let cpu = Cpu::new();
    let mut rng = Rng::new(0xf05e);
    let mut r = |s: &[usize], a: f32| rng.tensor(s, a);
    let mut out = Vec::new();

    for (m, k, n, alpha, bias) in [
        (37, 50, 70, 1.0, true),
        (37, 50, 70, 0.5, true),
        (300, 192, 768, 1.0, false),
        (1, 3, 1, 0.5, false),
    ] {
        let ins = [
            r(&[m, k], 1.0),
            r(&[n, k], 1.0 / (k as f32).sqrt()),
            r(&[n], 0.5),
            r(&[m, n], 1.0),
        ];
        out.push(both!(
            be,
            &cpu,
            format!("linear_residual {m}x{k}->{n} alpha {alpha} bias {bias}"),
            ins,
            tol,
            |b, x| b.linear_residual(&x[0], &x[1], bias.then_some(&x[2]), &x[3], alpha)
        ));
    }

    // CUDA takes a warp-per-row kernel (for layer_norm: with fusion on) when C is a multiple
    // of its 16-byte vector (8 in bf16, 4 in f32) and at most 2048: rows not a multiple of 4
    // (its rows per block), C = 1000 (a partly used last vector round), 1284 (a warp row in f32
    // only), 2048 (all registers); and the block kernel for 2500, 12 in bf16 and 1.
    for (shape, beta) in [
        (vec![5, 7, 96], 1.0),
        (vec![9, 768], 1.0),
        (vec![3, 1000], 0.5),
        (vec![2, 1284], 1.0),
        (vec![2, 2048], 1.0),
        (vec![3, 2500], 0.5),
        (vec![6, 12], 1.0),
        (vec![1, 1], 1.0),
    ] {
        let c = *shape.last().unwrap();
        let ins = [r(&shape, 1.0), r(&shape, 1.0), r(&[c], 1.0), r(&[c], 0.5)];
        out.extend(both_n!(
            be,
            &cpu,
            format!("add_layer_norm {shape:?} beta {beta}"),
            ["sum", "norm"],
            ins,
            tol,
            |b, x| {
                let (s, y) = b.add_layer_norm(&x[0], &x[1], beta, &x[2], &x[3], 1e-6)?;
                Ok(vec![s, y])
            }
        ));
        // Plain LayerNorm on the same shapes: CUDA's warp kernel when fusion is on.
        let ins = [r(&shape, 1.0), r(&[c], 1.0), r(&[c], 0.5)];
        out.push(both!(
            be,
            &cpu,
            format!("layer_norm {shape:?}"),
            ins,
            tol,
            |b, x| b.layer_norm(&x[0], &x[1], &x[2], 1e-6)
        ));
    }

    // (batch, H, W, window, heads, head dim)
    for (n, h, w, ws, heads, d) in [
        (2, 7, 5, 3, 2, 64),
        (1, 14, 14, 14, 2, 64),
        (1, 20, 13, 7, 2, 80),
        (2, 9, 9, 4, 3, 16),
        (1, 64, 64, 14, 1, 64),
    ] {
        for si in [false, true] {
            let c3 = 3 * heads * d;
            let ins = [
                r(&[n, h, w, c3], 1.0),
                r(&[c3], 1.0),
                rel_table(&mut r, ws, d, si),
                rel_table(&mut r, ws, d, si),
            ];
            let scale = (d as f32).powf(-0.5);
            out.push(both!(
                be,
                &cpu,
                format!(
                    "attention_qkv_windowed b{n} {h}x{w} ws{ws} h{heads} d{d}{}",
                    si_tag(si)
                ),
                ins,
                tol,
                |b, x| {
                    let rel = rel_pos(&x[2], &x[3], (ws, ws), si);
                    b.attention_qkv(
                        &x[0],
                        Tokens::Windows { ws, pad: &x[1] },
                        heads,
                        scale,
                        Some(rel),
                    )
                }
            ));
        }
    }

    // (volumes, slices, h, w, heads, head dim)
    for (v, depth, h, w, heads, d) in [
        (2, 6, 3, 5, 2, 64),
        (1, 4, 7, 7, 2, 80),
        (3, 3, 2, 2, 2, 16),
        (1, 96, 2, 3, 1, 64),
    ] {
        for si in [false, true] {
            let c3 = 3 * heads * d;
            let (dh, dw) = depth_grid(depth);
            let ins = [
                r(&[v * depth, h, w, c3], 1.0),
                rel_table(&mut r, dh, d, si),
                rel_table(&mut r, dw, d, si),
            ];
            let scale = (d as f32).powf(-0.5);
            out.push(both!(
                be,
                &cpu,
                format!(
                    "attention_qkv_depth v{v} d{depth} {h}x{w} h{heads} hd{d}{}",
                    si_tag(si)
                ),
                ins,
                tol,
                |b, x| {
                    let rel = rel_pos(&x[1], &x[2], (dh, dw), si);
                    b.attention_qkv(&x[0], Tokens::Depth { depth }, heads, scale, Some(rel))
                }
            ));
        }
    }
    out
}
