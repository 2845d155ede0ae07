//! Linear algebra against naive f64 loops: `linear` (with bias and fused activation), batched
//! `matmul` (plain and transposed B) and `layer_norm`.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, Backend};
use medsa::Tensor;

use super::{assert_close, gelu_ref, Rng};

fn linear_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Vec<f64> {
    let k = w.shape()[1];
    let n = w.shape()[0];
    let m = x.numel() / k;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = b.map_or(0.0, |b| b.data()[j] as f64);
            for kk in 0..k {
                acc += x.data()[i * k + kk] as f64 * w.data()[j * k + kk] as f64;
            }
            out[i * n + j] = match act {
                Act::None => acc,
                Act::Relu => acc.max(0.0),
                Act::Gelu => gelu_ref(acc),
            };
        }
    }
    out
}

#[test]
fn linear_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(6);
    for &(lead, k, n, bias, act) in &[
        (&[3usize, 5][..], 7usize, 9usize, true, Act::None),
        (&[1, 1], 1, 1, false, Act::None),
        (&[2, 33], 64, 40, true, Act::Gelu),
        (&[130], 96, 257, true, Act::Relu),
        (&[1, 200], 768, 300, false, Act::Gelu),
        (&[4], 3, 2, false, Act::Relu),
    ] {
        let mut xs = lead.to_vec();
        xs.push(k);
        let x = rng.tensor(&xs);
        let w = rng.tensor(&[n, k]);
        let b = rng.tensor(&[n]);
        let bo = bias.then_some(&b);
        let y = cpu.linear(&x, &w, bo, act).unwrap();
        let mut ys = lead.to_vec();
        ys.push(n);
        assert_close(
            &format!("linear {xs:?} x [{n},{k}] {act:?}"),
            &y,
            &ys,
            &linear_ref(&x, &w, bo, act),
            1e-5,
        );
    }
    assert!(cpu
        .linear(&rng.tensor(&[2, 3]), &rng.tensor(&[4, 5]), None, Act::None)
        .is_err());
    assert!(cpu
        .linear(
            &rng.tensor(&[2, 3]),
            &rng.tensor(&[4, 3]),
            Some(&rng.tensor(&[3])),
            Act::None
        )
        .is_err());
}

#[test]
fn matmul_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(7);
    for &(bt, m, k, n) in &[
        (1usize, 1usize, 1usize, 1usize),
        (3, 5, 7, 9),
        (2, 64, 33, 70),
        (8, 40, 32, 40),
        (1, 150, 200, 130),
    ] {
        for trans_b in [false, true] {
            let a = rng.tensor(&[bt, m, k]);
            let b = if trans_b {
                rng.tensor(&[bt, n, k])
            } else {
                rng.tensor(&[bt, k, n])
            };
            let y = cpu.matmul(&a, &b, trans_b).unwrap();
            let mut want = vec![0.0; bt * m * n];
            for t in 0..bt {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0.0;
                        for kk in 0..k {
                            let bv = if trans_b {
                                b.data()[(t * n + j) * k + kk]
                            } else {
                                b.data()[(t * k + kk) * n + j]
                            };
                            acc += a.data()[(t * m + i) * k + kk] as f64 * bv as f64;
                        }
                        want[(t * m + i) * n + j] = acc;
                    }
                }
            }
            assert_close(
                &format!("matmul {bt}x{m}x{k}x{n} t={trans_b}"),
                &y,
                &[bt, m, n],
                &want,
                1e-5,
            );
        }
    }
    assert!(cpu
        .matmul(&rng.tensor(&[2, 3, 4]), &rng.tensor(&[2, 5, 6]), false)
        .is_err());
    assert!(cpu
        .matmul(&rng.tensor(&[2, 3, 4]), &rng.tensor(&[1, 4, 6]), false)
        .is_err());
}

#[test]
fn layer_norm_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(8);
    for &(shape, offset) in &[
        (&[3usize, 5, 7][..], 0.0f32),
        (&[2, 768], 0.0),
        (&[4096, 256], 0.0),
        (&[10, 33], 1000.0),
        (&[1, 1], 0.0),
    ] {
        let x0 = rng.tensor(shape);
        let x = Tensor::from_vec(x0.data().iter().map(|&v| v + offset).collect(), shape).unwrap();
        let c = *shape.last().unwrap();
        let g = rng.tensor(&[c]);
        let b = rng.tensor(&[c]);
        let y = cpu.layer_norm(&x, &g, &b, 1e-6).unwrap();
        let mut want = vec![0.0; x.numel()];
        for r in 0..x.numel() / c {
            let row: Vec<f64> = x.data()[r * c..(r + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
            for i in 0..c {
                want[r * c + i] =
                    (row[i] - mean) / (var + 1e-6).sqrt() * g.data()[i] as f64 + b.data()[i] as f64;
            }
        }
        // With a mean of 1000, the input itself carries f32 rounding of ~3e-5 (x itself is
        // rounded), which the normalisation magnifies by 1/std ~ 1.7.
        let atol = if offset != 0.0 { 2e-4 } else { 1e-5 };
        assert_close(
            &format!("layer_norm {shape:?} +{offset}"),
            &y,
            shape,
            &want,
            atol,
        );
    }
    assert!(cpu
        .layer_norm(
            &rng.tensor(&[2, 4]),
            &rng.tensor(&[3]),
            &rng.tensor(&[4]),
            1e-5
        )
        .is_err());
}
