//! LayerNorm backward: the f64 reference through the full per-row Jacobian, checked against
//! finite differences, then the backend against that reference.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::sam::random::Rng;

use super::{assert_fd, check, f64s, finite_diff};

/// LayerNorm forward in f64 (two-pass statistics, biased variance).
fn layer_norm_fwd(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let c = g.len();
    let mut y = vec![0.0; x.len()];
    for (row, out) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            out[i] = (row[i] - mean) * rstd * g[i] + b[i];
        }
    }
    y
}

/// LayerNorm backward through the full per-row Jacobian of `xhat`:
/// `d xhat_j / d x_i = rstd (delta_ij - 1/C) - rstd xhat_i xhat_j / C`.
fn layer_norm_bwd(x: &[f64], g: &[f64], dy: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let c = g.len();
    let mut dx = vec![0.0; x.len()];
    let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
    for r in 0..x.len() / c {
        let row = &x[r * c..(r + 1) * c];
        let gy = &dy[r * c..(r + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        for j in 0..c {
            dg[j] += gy[j] * xhat[j];
            db[j] += gy[j];
        }
        for i in 0..c {
            let mut acc = 0.0;
            for j in 0..c {
                let delta = if i == j { 1.0 } else { 0.0 };
                let jac = rstd * (delta - 1.0 / c as f64) - rstd * xhat[i] * xhat[j] / c as f64;
                acc += gy[j] * g[j] * jac;
            }
            dx[r * c + i] = acc;
        }
    }
    (dx, dg, db)
}

#[test]
fn layer_norm_reference_matches_finite_differences() {
    let mut rng = Rng::new(4);
    let (rows, c, eps) = (3, 6, 1e-5);
    let x = f64s(&rng.tensor(&[rows, c], 2.0));
    let g = f64s(&rng.tensor(&[c], 1.0));
    let b = f64s(&rng.tensor(&[c], 1.0));
    let w = f64s(&rng.tensor(&[rows, c], 1.0));
    // loss = sum(y * w), so dy = w.
    let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
        layer_norm_fwd(x, g, b, eps)
            .iter()
            .zip(&w)
            .map(|(y, w)| y * w)
            .sum()
    };
    let (dx, dg, db) = layer_norm_bwd(&x, &g, &w, eps);
    assert_fd("layer_norm dx", &dx, &finite_diff(&x, |p| loss(p, &g, &b)));
    assert_fd("layer_norm dg", &dg, &finite_diff(&g, |p| loss(&x, p, &b)));
    assert_fd("layer_norm db", &db, &finite_diff(&b, |p| loss(&x, &g, p)));
}

#[test]
fn layer_norm_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    // The [300, 200] case splits into two row chunks on the parallel path; the offset exercises
    // the two-pass statistics.
    for (shape, offset) in [
        (&[3usize, 5, 24][..], 0.0f32),
        (&[4, 7], 3.0),
        (&[300, 200], 0.0),
        (&[2, 768], 0.0),
        (&[5, 1], 0.0),
    ] {
        let mut x = rng.tensor(shape, 1.0);
        for v in x.data_mut() {
            *v += offset;
        }
        let c = *shape.last().unwrap();
        let g = rng.tensor(&[c], 1.5);
        let dy = rng.tensor(shape, 1.0);
        let eps = 1e-6;
        let (dx, dg, db) = cpu.layer_norm_backward(&x, &g, &dy, eps).unwrap();
        let (dx_ref, dg_ref, db_ref) = layer_norm_bwd(&f64s(&x), &f64s(&g), &f64s(&dy), eps as f64);
        let what = format!("layer_norm_backward {shape:?} +{offset}");
        // dx multiplies f32-rounded statistics by 1/std (~1.7 for uniform inputs): 1e-4.
        check(&format!("{what} dx"), &dx, shape, &dx_ref, 1e-4);
        check(&format!("{what} dg"), &dg, &[c], &dg_ref, 1e-4);
        check(&format!("{what} db"), &db, &[c], &db_ref, 1e-5);
    }
    let x = rng.tensor(&[4, 3], 1.0);
    assert!(cpu
        .layer_norm_backward(&x, &rng.tensor(&[4], 1.0), &x, 1e-5)
        .is_err());
    assert!(cpu
        .layer_norm_backward(&x, &rng.tensor(&[3], 1.0), &rng.tensor(&[3, 4], 1.0), 1e-5)
        .is_err());
}
