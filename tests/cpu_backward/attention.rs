//! Attention backward (with and without the decomposed relative-position bias): the f64
//! chain-rule reference against finite differences, the backend against the reference,
//! thread-count determinism, and shape errors.

use medsa::backend::cpu::Cpu;
use medsa::backend::{AttentionGrads, Backend, RelPos};
use medsa::sam::random::Rng;
use medsa::Tensor;

use super::{assert_fd, bitwise, check, f64s, finite_diff, with_threads};

/// Attention geometry for the f64 reference.
#[derive(Clone, Copy, Debug)]
struct Attn {
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    /// `(q_grid, k_grid)` when a relative-position bias is used.
    rel: Option<((usize, usize), (usize, usize))>,
}

impl Attn {
    fn c(&self) -> usize {
        self.heads * self.d
    }
}

/// Probabilities of query `i` of `(bi, h)`: the logits `scale q k^T + bias` materialised and
/// softmaxed in f64.
fn attn_probs(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    rh: &[f64],
    rw: &[f64],
    scale: f64,
    (bi, h, i): (usize, usize, usize),
) -> Vec<f64> {
    let (c, d) = (a.c(), a.d);
    let qi = &q[(bi * a.lq + i) * c + h * d..][..d];
    let mut s: Vec<f64> = (0..a.lk)
        .map(|j| {
            let kj = &k[(bi * a.lk + j) * c + h * d..][..d];
            let mut acc = scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>();
            if let Some(((_, qw), (kh, kw))) = a.rel {
                let (qy, qx, ky, kx) = (i / qw, i % qw, j / kw, j % kw);
                for cc in 0..d {
                    acc += qi[cc] * rh[(qy * kh + ky) * d + cc];
                    acc += qi[cc] * rw[(qx * kw + kx) * d + cc];
                }
            }
            acc
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s
        .iter_mut()
        .map(|x| {
            *x = (*x - m).exp();
            *x
        })
        .sum();
    s.iter_mut().for_each(|x| *x /= z);
    s
}

/// Attention forward in f64.
fn attn_fwd(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rh: &[f64],
    rw: &[f64],
    scale: f64,
) -> Vec<f64> {
    let (c, d) = (a.c(), a.d);
    let mut o = vec![0.0; a.b * a.lq * c];
    for bi in 0..a.b {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let p = attn_probs(a, q, k, rh, rw, scale, (bi, h, i));
                for (j, pj) in p.iter().enumerate() {
                    for cc in 0..d {
                        o[(bi * a.lq + i) * c + h * d + cc] +=
                            pj * v[(bi * a.lk + j) * c + h * d + cc];
                    }
                }
            }
        }
    }
    o
}

/// Gradients `(dq, dk, dv, drh, drw)` of attention in f64, element by element through the chain
/// rule: `dP = dO V^T`, the softmax Jacobian `dS_j = sum_l dP_l P_l (delta_jl - P_j)`, then every
/// logit's partial derivatives (`scale k_j`, `scale q_i`, and the bias' `q_i`, `rh`, `rw`).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn attn_bwd(
    a: &Attn,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rh: &[f64],
    rw: &[f64],
    d_o: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, d) = (a.c(), a.d);
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut drh = vec![0.0; rh.len()];
    let mut drw = vec![0.0; rw.len()];
    for bi in 0..a.b {
        for h in 0..a.heads {
            for i in 0..a.lq {
                let p = attn_probs(a, q, k, rh, rw, scale, (bi, h, i));
                let qa = (bi * a.lq + i) * c + h * d;
                let dp: Vec<f64> = (0..a.lk)
                    .map(|j| {
                        let va = (bi * a.lk + j) * c + h * d;
                        (0..d).map(|cc| d_o[qa + cc] * v[va + cc]).sum()
                    })
                    .collect();
                for j in 0..a.lk {
                    let ka = (bi * a.lk + j) * c + h * d;
                    for cc in 0..d {
                        dv[ka + cc] += p[j] * d_o[qa + cc];
                    }
                    let mut ds = 0.0;
                    for l in 0..a.lk {
                        let delta = if j == l { 1.0 } else { 0.0 };
                        ds += dp[l] * p[l] * (delta - p[j]);
                    }
                    for cc in 0..d {
                        dq[qa + cc] += ds * scale * k[ka + cc];
                        dk[ka + cc] += ds * scale * q[qa + cc];
                    }
                    if let Some(((_, qw), (kh, kw))) = a.rel {
                        let (qy, qx, ky, kx) = (i / qw, i % qw, j / kw, j % kw);
                        for cc in 0..d {
                            let (ah, aw) = ((qy * kh + ky) * d + cc, (qx * kw + kx) * d + cc);
                            dq[qa + cc] += ds * (rh[ah] + rw[aw]);
                            drh[ah] += ds * q[qa + cc];
                            drw[aw] += ds * q[qa + cc];
                        }
                    }
                }
            }
        }
    }
    (dq, dk, dv, drh, drw)
}

/// Random inputs of one attention case: `(q, k, v, rh, rw, d_o)`.
fn attn_inputs(a: &Attn, rng: &mut Rng) -> [Tensor; 6] {
    let c = a.c();
    let ((qh, qw), (kh, kw)) = a.rel.unwrap_or(((0, 0), (0, 0)));
    [
        rng.tensor(&[a.b, a.lq, c], 1.0),
        rng.tensor(&[a.b, a.lk, c], 1.0),
        rng.tensor(&[a.b, a.lk, c], 1.0),
        rng.tensor(&[qh, kh, a.d], 0.3),
        rng.tensor(&[qw, kw, a.d], 0.3),
        rng.tensor(&[a.b, a.lq, c], 1.0),
    ]
}

fn rel_of<'a>(a: &Attn, rh: &'a Tensor, rw: &'a Tensor) -> Option<RelPos<'a, Tensor>> {
    a.rel.map(|(q_grid, k_grid)| RelPos {
        rh,
        rw,
        q_grid,
        k_grid,
        shift_invariant: false,
    })
}

fn cpu_attn_grads(cpu: &Cpu, a: &Attn, x: &[Tensor; 6], scale: f32) -> AttentionGrads<Tensor> {
    let [q, k, v, rh, rw, d_o] = x;
    let o = cpu
        .attention(q, k, v, a.heads, scale, rel_of(a, rh, rw))
        .unwrap();
    cpu.attention_backward(q, k, v, &o, d_o, a.heads, scale, rel_of(a, rh, rw))
        .unwrap()
}

fn grid(qg: (usize, usize), kg: (usize, usize)) -> Option<((usize, usize), (usize, usize))> {
    Some((qg, kg))
}

#[test]
fn attention_reference_matches_finite_differences() {
    let mut rng = Rng::new(6);
    // Relative bias with different query and key grids, two heads, a batch of two.
    let a = Attn {
        b: 2,
        lq: 6,
        lk: 6,
        heads: 2,
        d: 4,
        rel: grid((3, 2), (2, 3)),
    };
    let scale = 0.5;
    let x = attn_inputs(&a, &mut rng);
    let [q, k, v, rh, rw, w] = x.each_ref().map(f64s);
    // loss = sum(o * w), so d_o = w.
    let loss = |q: &[f64], k: &[f64], v: &[f64], rh: &[f64], rw: &[f64]| -> f64 {
        attn_fwd(&a, q, k, v, rh, rw, scale)
            .iter()
            .zip(&w)
            .map(|(o, w)| o * w)
            .sum()
    };
    let (dq, dk, dv, drh, drw) = attn_bwd(&a, &q, &k, &v, &rh, &rw, &w, scale);
    assert_fd("dq", &dq, &finite_diff(&q, |p| loss(p, &k, &v, &rh, &rw)));
    assert_fd("dk", &dk, &finite_diff(&k, |p| loss(&q, p, &v, &rh, &rw)));
    assert_fd("dv", &dv, &finite_diff(&v, |p| loss(&q, &k, p, &rh, &rw)));
    assert_fd("drh", &drh, &finite_diff(&rh, |p| loss(&q, &k, &v, p, &rw)));
    assert_fd("drw", &drw, &finite_diff(&rw, |p| loss(&q, &k, &v, &rh, p)));
}

#[test]
fn attention_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(7);
    let cases = [
        // Windowed-attention shape, odd grid, one and three heads.
        Attn {
            b: 2,
            lq: 35,
            lk: 35,
            heads: 1,
            d: 8,
            rel: grid((7, 5), (7, 5)),
        },
        Attn {
            b: 2,
            lq: 35,
            lk: 35,
            heads: 3,
            d: 16,
            rel: grid((7, 5), (7, 5)),
        },
        // Query and key grids that differ.
        Attn {
            b: 2,
            lq: 35,
            lk: 12,
            heads: 3,
            d: 8,
            rel: grid((7, 5), (3, 4)),
        },
        // Two query blocks (143 rows -> 2 x 72) per head, with keys on another grid.
        Attn {
            b: 1,
            lq: 143,
            lk: 99,
            heads: 2,
            d: 8,
            rel: grid((13, 11), (9, 11)),
        },
        // Cross attention (Lq != Lk), no bias, both ways round.
        Attn {
            b: 2,
            lq: 7,
            lk: 13,
            heads: 3,
            d: 8,
            rel: None,
        },
        Attn {
            b: 2,
            lq: 35,
            lk: 6,
            heads: 1,
            d: 16,
            rel: None,
        },
        Attn {
            b: 2,
            lq: 7,
            lk: 70,
            heads: 3,
            d: 16,
            rel: None,
        },
        // Parallel path with more (batch, head) tasks than table-gradient groups.
        Attn {
            b: 3,
            lq: 64,
            lk: 64,
            heads: 8,
            d: 16,
            rel: grid((8, 8), (8, 8)),
        },
        Attn {
            b: 1,
            lq: 1,
            lk: 1,
            heads: 1,
            d: 3,
            rel: grid((1, 1), (1, 1)),
        },
    ];
    for a in cases {
        for scale in [1.0 / (a.d as f32).sqrt(), 2.0] {
            let x = attn_inputs(&a, &mut rng);
            let g = cpu_attn_grads(&cpu, &a, &x, scale);
            let [q, k, v, rh, rw, d_o] = x.each_ref().map(f64s);
            let (dq, dk, dv, drh, drw) = attn_bwd(&a, &q, &k, &v, &rh, &rw, &d_o, scale as f64);
            let what = format!("{a:?} scale {scale}");
            let (c, d) = (a.c(), a.d);
            // f32 GEMMs over Lk (dq) or Lq (dk, dv) terms and f32 probabilities: 1e-4 of the
            // tensor's RMS. The tables sum over batch, heads and queries: 2e-4.
            check(&format!("{what} dq"), &g.dq, &[a.b, a.lq, c], &dq, 1e-4);
            check(&format!("{what} dk"), &g.dk, &[a.b, a.lk, c], &dk, 1e-4);
            check(&format!("{what} dv"), &g.dv, &[a.b, a.lk, c], &dv, 1e-4);
            match (a.rel, g.drel) {
                (Some(((qh, qw), (kh, kw))), Some((grh, grw))) => {
                    check(&format!("{what} drh"), &grh, &[qh, kh, d], &drh, 2e-4);
                    check(&format!("{what} drw"), &grw, &[qw, kw, d], &drw, 2e-4);
                }
                (None, None) => {}
                _ => panic!("{what}: drel present without rel or missing with it"),
            }
        }
    }
}

#[test]
fn attention_backward_is_deterministic_across_threads() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(8);
    let a = Attn {
        b: 3,
        lq: 144,
        lk: 144,
        heads: 8,
        d: 16,
        rel: grid((12, 12), (12, 12)),
    };
    // Two query blocks per head and more tasks than table-gradient groups.
    let x = attn_inputs(&a, &mut rng);
    let one = with_threads(1, || cpu_attn_grads(&cpu, &a, &x, 0.25));
    let three = with_threads(3, || cpu_attn_grads(&cpu, &a, &x, 0.25));
    bitwise("dq", &one.dq, &three.dq);
    bitwise("dk", &one.dk, &three.dk);
    bitwise("dv", &one.dv, &three.dv);
    let ((h1, w1), (h3, w3)) = (one.drel.unwrap(), three.drel.unwrap());
    bitwise("drh", &h1, &h3);
    bitwise("drw", &w1, &w3);
}

#[test]
fn attention_backward_rejects_bad_shapes() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(9);
    let t = rng.tensor(&[1, 4, 6], 1.0);
    let o5 = rng.tensor(&[1, 5, 6], 1.0);
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &t, 4, 1.0, None)
        .is_err());
    assert!(cpu
        .attention_backward(&t, &t, &t, &o5, &t, 2, 1.0, None)
        .is_err());
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &o5, 2, 1.0, None)
        .is_err());
    let rh = rng.tensor(&[2, 2, 3], 1.0);
    let rw = rng.tensor(&[2, 3, 3], 1.0);
    let rel = RelPos {
        rh: &rh,
        rw: &rw,
        q_grid: (2, 2),
        k_grid: (2, 2),
        shift_invariant: false,
    };
    assert!(cpu
        .attention_backward(&t, &t, &t, &t, &t, 2, 1.0, Some(rel))
        .is_err());
}
