//! The backward ops against the CPU reference on random inputs (part of [`super::ops`]).

use super::{fail, pair, pair_n, AttnCase, Check, Tolerance};
use crate::backend::cpu::Cpu;
use crate::backend::{Act, Backend, RelPos};
use crate::sam::random::Rng;

/// Absolute-tolerance floor of the backward checks (fraction of the reference's rms): their
/// outputs are differences of reductions done in another order on each backend (attention's
/// `dP - Dr`, LayerNorm's `dh - mean(dh) - xh mean(dh xh)`), which costs a few f32 ulps of the
/// terms rather than of the result.
const BWD_ATOL_RMS_FLOOR: f32 = 3e-4;

/// The backward ops against the CPU reference on random inputs (part of [`ops`]).
pub fn backward_ops<B: Backend>(be: &B, tol: Tolerance) -> Vec<Check> {
    let tol = Tolerance {
        atol_rms: tol.atol_rms.max(BWD_ATOL_RMS_FLOOR),
        ..tol
    };
    let cpu = Cpu::new();
    let mut rng = Rng::new(0xbac4);
    let mut r = |s: &[usize], a: f32| rng.tensor(s, a);
    let mut out = Vec::new();
    for act in [Act::Gelu, Act::Relu, Act::None] {
        let ins = [r(&[1001], 4.0), r(&[1001], 1.0)];
        out.push(both!(
            be,
            &cpu,
            format!("activate_backward {act:?}"),
            ins,
            tol,
            |b, x| b.activate_backward(&x[0], &x[1], act)
        ));
    }
    for (rows, cols) in [(37, 50), (4097, 3), (1, 7), (300, 768)] {
        let ins = [r(&[rows, cols], 1.0)];
        out.push(both!(
            be,
            &cpu,
            format!("sum_rows {rows}x{cols}"),
            ins,
            tol,
            |b, x| b.sum_rows(&x[0], cols)
        ));
    }
    for (m, k, n) in [(37, 50, 70), (1, 3, 1), (300, 256, 2048)] {
        let ins = [r(&[m, n], 1.0), r(&[n, k], 1.0 / (k as f32).sqrt())];
        out.push(both!(
            be,
            &cpu,
            format!("linear_backward_input {m}x{n} w {n}x{k}"),
            ins,
            tol,
            |b, x| b.linear_backward_input(&x[0], &x[1])
        ));
        let ins = [r(&[m, k], 1.0), r(&[m, n], 1.0)];
        out.extend(both_n!(
            be,
            &cpu,
            format!("linear_backward_weight x {m}x{k} dy {m}x{n}"),
            ["dw", "db"],
            ins,
            tol,
            |b, x| {
                let (dw, db) = b.linear_backward_weight(&x[0], &x[1], true)?;
                Ok(std::iter::once(dw).chain(db).collect())
            }
        ));
    }
    for (rows, c) in [(13, 33), (300, 768), (5, 1), (64, 256), (3, 2500)] {
        let ins = [r(&[rows, c], 3.0), r(&[c], 1.0), r(&[rows, c], 1.0)];
        out.extend(both_n!(
            be,
            &cpu,
            format!("layer_norm_backward {rows}x{c}"),
            ["dx", "dg", "db"],
            ins,
            tol,
            |b, x| {
                let (dx, dg, db) = b.layer_norm_backward(&x[0], &x[1], &x[2], 1e-6)?;
                Ok(vec![dx, dg, db])
            }
        ));
    }
    // Attention: Lq != Lk without bias, rel-pos on odd, windowed (14x14) and non-square grids,
    // every compiled head-dim bucket (16, 32, 64, 80, 128) and an odd head dim.
    let cases: &[AttnCase] = &[
        (2, 37, 53, 3, 16, None),
        (1, 5, 5, 8, 4, None),
        (1, 70, 129, 1, 128, None),
        (2, 35, 35, 2, 64, Some(((5, 7), (5, 7)))),
        (2, 196, 196, 2, 64, Some(((14, 14), (14, 14)))),
        (1, 196, 196, 2, 80, Some(((14, 14), (14, 14)))),
        (1, 20, 42, 2, 24, Some(((4, 5), (6, 7)))),
        (1, 64, 64, 3, 33, Some(((8, 8), (8, 8)))),
    ];
    for &(bsz, lq, lk, h, d, grid) in cases {
        let scale = (d as f32).powf(-0.5);
        let mut ins = vec![
            r(&[bsz, lq, h * d], 1.0),
            r(&[bsz, lk, h * d], 1.0),
            r(&[bsz, lk, h * d], 1.0),
            r(&[bsz, lq, h * d], 1.0),
        ];
        if let Some(((qh, qw), (kh, kw))) = grid {
            ins.push(r(&[qh, kh, d], 0.2));
            ins.push(r(&[qw, kw, d], 0.2));
        }
        // The forward output, from the reference (both backends get the same `o`).
        let o = {
            let rel = grid.map(|(qg, kg)| RelPos {
                rh: &ins[4],
                rw: &ins[5],
                q_grid: qg,
                k_grid: kg,
                shift_invariant: false,
            });
            cpu.attention(&ins[0], &ins[1], &ins[2], h, scale, rel)
        };
        let o = match o {
            Ok(o) => o,
            Err(e) => {
                out.push(fail("attention_backward (forward)", e));
                continue;
            }
        };
        ins.push(o);
        let labels: &[&str] = if grid.is_some() {
            &["dq", "dk", "dv", "drh", "drw"]
        } else {
            &["dq", "dk", "dv"]
        };
        let no = ins.len() - 1;
        out.extend(both_n!(
            be,
            &cpu,
            format!(
                "attention_backward b{bsz} {lq}x{lk} h{h} d{d} rel {}",
                grid.is_some()
            ),
            labels,
            ins,
            tol,
            |b, x| {
                let rel = grid.map(|(qg, kg)| RelPos {
                    rh: &x[4],
                    rw: &x[5],
                    q_grid: qg,
                    k_grid: kg,
                    shift_invariant: false,
                });
                let g = b.attention_backward(&x[0], &x[1], &x[2], &x[no], &x[3], h, scale, rel)?;
                let mut v = vec![g.dq, g.dk, g.dv];
                if let Some((drh, drw)) = g.drel {
                    v.push(drh);
                    v.push(drw);
                }
                Ok(v)
            }
        ));
    }
    for (s, w, stride, pad, need_dx) in [
        (vec![2, 9, 11, 5], vec![7, 5, 3, 3], 1, 1, true),
        (vec![2, 9, 11, 5], vec![7, 5, 3, 3], 2, 1, true),
        (vec![1, 64, 48, 3], vec![8, 3, 16, 16], 16, 0, true),
        (vec![1, 32, 32, 3], vec![8, 3, 16, 16], 16, 0, false),
        (vec![2, 16, 16, 1], vec![4, 1, 2, 2], 2, 0, true),
    ] {
        let (bn, h, wd) = (s[0], s[1], s[2]);
        let ho = (h + 2 * pad - w[2]) / stride + 1;
        let wo = (wd + 2 * pad - w[3]) / stride + 1;
        let ins = [r(&s, 1.0), r(&w, 0.3), r(&[bn, ho, wo, w[0]], 1.0)];
        let labels: &[&str] = if need_dx {
            &["dx", "dw", "db"]
        } else {
            &["dw", "db"]
        };
        out.extend(both_n!(
            be,
            &cpu,
            format!("conv2d_backward {s:?} {w:?} s{stride} p{pad}"),
            labels,
            ins,
            tol,
            |b, x| {
                let (dx, dw, db) =
                    b.conv2d_backward(&x[0], &x[1], &x[2], stride, pad, need_dx, true)?;
                Ok(dx.into_iter().chain([dw]).chain(db).collect())
            }
        ));
    }
    let ins = [
        r(&[2, 5, 6, 8], 1.0),
        r(&[8, 4, 2, 2], 0.3),
        r(&[2, 10, 12, 4], 1.0),
    ];
    out.extend(both_n!(
        be,
        &cpu,
        "conv_transpose2x2_backward",
        ["dx", "dw", "db"],
        ins,
        tol,
        |b, x| {
            let (dx, dw, db) = b.conv_transpose2x2_backward(&x[0], &x[1], &x[2])?;
            Ok(vec![dx, dw, db])
        }
    ));
    out
}
