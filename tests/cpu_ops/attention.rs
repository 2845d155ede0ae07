//! Attention against a naive f64 softmax reference, plain and with SAM's decomposed relative
//! position bias, plus the CPU's windowed-attention override against the generic fused sequence.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Backend, RelPos, Tokens};
use medsa::Tensor;

use super::{assert_close, Rng};

/// Relative-position inputs of the reference: `(rh, rw, q_grid, k_grid)`.
type RelRef<'a> = (&'a Tensor, &'a Tensor, (usize, usize), (usize, usize));

fn attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    rel: Option<RelRef<'_>>,
) -> Vec<f64> {
    let (b, lq, c) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = c / heads;
    let (qd, kd, vd) = (q.data(), k.data(), v.data());
    let mut out = vec![0.0; b * lq * c];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..lq {
                let qv = |cc: usize| qd[(bi * lq + i) * c + h * d + cc] as f64;
                let mut s = vec![0.0f64; lk];
                for (j, sj) in s.iter_mut().enumerate() {
                    let mut acc = 0.0;
                    for cc in 0..d {
                        acc += qv(cc) * kd[(bi * lk + j) * c + h * d + cc] as f64;
                    }
                    *sj = scale * acc;
                    if let Some((rh, rw, (_qh, qw), (kh, kw))) = rel {
                        let (qy, qx) = (i / qw, i % qw);
                        let (ky, kx) = (j / kw, j % kw);
                        let _ = kh;
                        let mut bias = 0.0;
                        for cc in 0..d {
                            bias += qv(cc) * rh.data()[(qy * kh + ky) * d + cc] as f64;
                            bias += qv(cc) * rw.data()[(qx * kw + kx) * d + cc] as f64;
                        }
                        *sj += bias;
                    }
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for cc in 0..d {
                    let mut acc = 0.0;
                    for j in 0..lk {
                        acc += e[j] / z * vd[(bi * lk + j) * c + h * d + cc] as f64;
                    }
                    out[(bi * lq + i) * c + h * d + cc] = acc;
                }
            }
        }
    }
    out
}

#[test]
fn attention_plain_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(9);
    for &(b, lq, lk, heads, d) in &[
        (1usize, 5usize, 5usize, 1usize, 2usize),
        (2, 7, 300, 8, 16),
        (1, 300, 7, 8, 16),
        (1, 200, 200, 3, 80),
        (3, 33, 65, 2, 7),
        (1, 257, 129, 2, 64),
        (1, 1, 1, 4, 3),
    ] {
        let q = rng.tensor(&[b, lq, heads * d]);
        let k = rng.tensor(&[b, lk, heads * d]);
        let v = rng.tensor(&[b, lk, heads * d]);
        // A large scale makes the softmax peaky, which exercises the max subtraction.
        for scale in [1.0 / (d as f32).sqrt(), 4.0] {
            let y = cpu.attention(&q, &k, &v, heads, scale, None).unwrap();
            let want = attention_ref(&q, &k, &v, heads, scale as f64, None);
            assert_close(
                &format!("attention b{b} lq{lq} lk{lk} h{heads} d{d} s{scale}"),
                &y,
                &[b, lq, heads * d],
                &want,
                1e-5,
            );
        }
    }
    let t = rng.tensor(&[1, 4, 6]);
    assert!(cpu.attention(&t, &t, &t, 4, 1.0, None).is_err());
    assert!(cpu
        .attention(&t, &rng.tensor(&[1, 4, 8]), &t, 2, 1.0, None)
        .is_err());
    assert!(cpu
        .attention(&t, &t, &rng.tensor(&[1, 5, 6]), 2, 1.0, None)
        .is_err());
}

#[test]
fn attention_rel_pos_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(10);
    for &(b, (qh, qw), (kh, kw), heads, d) in &[
        (2usize, (3usize, 4usize), (3usize, 4usize), 2usize, 8usize),
        (1, (14, 14), (14, 14), 3, 64),
        (1, (5, 7), (4, 6), 1, 5),
        (1, (16, 16), (16, 16), 2, 32),
        (2, (2, 3), (9, 11), 2, 2),
    ] {
        let (lq, lk) = (qh * qw, kh * kw);
        let q = rng.tensor(&[b, lq, heads * d]);
        let k = rng.tensor(&[b, lk, heads * d]);
        let v = rng.tensor(&[b, lk, heads * d]);
        let rh = rng.tensor(&[qh, kh, d]);
        let rw = rng.tensor(&[qw, kw, d]);
        let scale = 1.0 / (d as f32).sqrt();
        let rel = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (qh, qw),
            k_grid: (kh, kw),
            shift_invariant: false,
        };
        let y = cpu.attention(&q, &k, &v, heads, scale, Some(rel)).unwrap();
        let want = attention_ref(
            &q,
            &k,
            &v,
            heads,
            scale as f64,
            Some((&rh, &rw, (qh, qw), (kh, kw))),
        );
        assert_close(
            &format!("attention rel {qh}x{qw} -> {kh}x{kw} h{heads} d{d}"),
            &y,
            &[b, lq, heads * d],
            &want,
            1e-5,
        );
        let bad = RelPos {
            rh: &rh,
            rw: &rw,
            q_grid: (qw, qh + 1),
            k_grid: (kh, kw),
            shift_invariant: false,
        };
        assert!(cpu.attention(&q, &k, &v, heads, scale, Some(bad)).is_err());
    }
}

/// The CPU's windowed attention (padding rows written by the partition) equals the generic
/// sequence of `backend::fused` (zero padding, then an exact outer-product fill) bit for bit, on
/// maps padded on one axis, on both, and not at all.
#[test]
fn windowed_attention_override_equals_the_plain_sequence() {
    let be = Cpu::new();
    let mut rng = Rng::new(31);
    for (n, h, w, ws) in [(2, 7, 5, 3), (1, 6, 9, 3), (1, 8, 8, 4)] {
        let (heads, d) = (2, 8);
        let c3 = 3 * heads * d;
        let qkv = rng.tensor(&[n, h, w, c3]);
        let pad = rng.tensor(&[c3]);
        let rh = rng.tensor(&[ws, ws, d]);
        let rw = rng.tensor(&[ws, ws, d]);
        let rel = || Some(RelPos::within(&rh, &rw, (ws, ws)));
        let a = be
            .attention_qkv(&qkv, Tokens::Windows { ws, pad: &pad }, heads, 0.35, rel())
            .unwrap();
        let b =
            medsa::backend::fused::attention_qkv_windowed(&be, &qkv, &pad, ws, heads, 0.35, rel())
                .unwrap();
        assert_eq!(a.shape(), &[n, h, w, heads * d]);
        assert_eq!(a.data(), b.data(), "{n}x{h}x{w} ws {ws}");
    }
}
