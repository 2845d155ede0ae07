//! `sum_rows` and the linear layer's backward (`dx`, `dw`, `db`) against direct f64 loops.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::sam::random::Rng;
use medsa::Tensor;

use super::{bitwise, check};

fn sum_rows_ref(x: &Tensor, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for (i, &v) in x.data().iter().enumerate() {
        out[i % cols] += v as f64;
    }
    out
}

#[test]
fn sum_rows_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    // One chunk, several serial chunks, several parallel chunks (narrow and wide rows).
    for (shape, cols) in [
        (&[7usize, 5][..], 5usize),
        (&[2, 3, 4], 12),
        (&[1000, 3], 3),
        (&[70000, 3], 3),
        (&[200, 768], 768),
        (&[4, 5, 6], 30),
        (&[4, 5, 6], 1),
    ] {
        let x = rng.tensor(shape, 1.0);
        let got = cpu.sum_rows(&x, cols).unwrap();
        check(
            &format!("sum_rows {shape:?} / {cols}"),
            &got,
            &[cols],
            &sum_rows_ref(&x, cols),
            1e-5,
        );
    }
    let x = rng.tensor(&[4, 5], 1.0);
    assert!(cpu.sum_rows(&x, 3).is_err());
    assert!(cpu.sum_rows(&x, 0).is_err());
}

/// `dx = dy @ w`, `dw = dy^T x`, `db = sum_rows(dy)` by direct loops.
fn linear_grads_ref(x: &Tensor, w: &Tensor, dy: &Tensor) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = dy.numel() / n;
    let (xd, wd, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; rows * k];
    let mut dw = vec![0.0; n * k];
    let mut db = vec![0.0; n];
    for r in 0..rows {
        for o in 0..n {
            let g = yd[r * n + o] as f64;
            db[o] += g;
            for i in 0..k {
                dx[r * k + i] += g * wd[o * k + i] as f64;
                dw[o * k + i] += g * xd[r * k + i] as f64;
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn linear_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    // The last case is large enough for gemm's threaded path.
    for (lead, k, n) in [
        (&[2usize, 7][..], 13usize, 11usize),
        (&[1][..], 1, 1),
        (&[3, 1, 5][..], 64, 3),
        (&[600][..], 96, 80),
    ] {
        let xs: Vec<usize> = lead.iter().copied().chain([k]).collect();
        let ys: Vec<usize> = lead.iter().copied().chain([n]).collect();
        let x = rng.tensor(&xs, 1.0);
        let w = rng.tensor(&[n, k], 1.0);
        let dy = rng.tensor(&ys, 1.0);
        let (dx_ref, dw_ref, db_ref) = linear_grads_ref(&x, &w, &dy);
        let what = format!("linear {xs:?} -> {n}");
        let dx = cpu.linear_backward_input(&dy, &w).unwrap();
        check(&format!("{what} dx"), &dx, &xs, &dx_ref, 1e-5);
        let (dw, db) = cpu.linear_backward_weight(&x, &dy, true).unwrap();
        check(&format!("{what} dw"), &dw, &[n, k], &dw_ref, 1e-5);
        check(&format!("{what} db"), &db.unwrap(), &[n], &db_ref, 1e-5);
        let (dw2, db2) = cpu.linear_backward_weight(&x, &dy, false).unwrap();
        assert!(db2.is_none());
        bitwise(&format!("{what} dw without bias"), &dw2, &dw);
    }
    let x = rng.tensor(&[4, 3], 1.0);
    assert!(cpu
        .linear_backward_input(&rng.tensor(&[4, 5], 1.0), &rng.tensor(&[4, 3], 1.0))
        .is_err());
    assert!(cpu
        .linear_backward_weight(&x, &rng.tensor(&[5, 2], 1.0), true)
        .is_err());
}
