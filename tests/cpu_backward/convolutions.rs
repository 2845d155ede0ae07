//! `conv2d_backward` and `conv_transpose2x2_backward` against direct f64 loops.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::sam::random::Rng;
use medsa::Tensor;

use super::{bitwise, check};

/// conv2d gradients by direct loops over (output pixel, tap, channels): `(dx, dw, db)`.
fn conv2d_grads_ref(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, h, wd, cin) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cout, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let (ho, wo) = (dy.shape()[1], dy.shape()[2]);
    let (xd, wdt, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; x.numel()];
    let mut dw = vec![0.0; w.numel()];
    let mut db = vec![0.0; cout];
    for bi in 0..bn {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let g = yd[((bi * ho + oy) * wo + ox) * cout + o] as f64;
                    db[o] += g;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            for c in 0..cin {
                                let xa = ((bi * h + iy as usize) * wd + ix as usize) * cin + c;
                                let wa = ((o * cin + c) * kh + ky) * kw + kx;
                                dx[xa] += g * wdt[wa] as f64;
                                dw[wa] += g * xd[xa] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn conv2d_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(10);
    // (b, h, w, cin, cout, (kh, kw), stride, pad)
    for (b, h, w, cin, cout, (kh, kw), stride, pad) in [
        (
            2usize,
            8usize,
            12usize,
            3usize,
            5usize,
            (4usize, 4usize),
            4usize,
            0usize,
        ), // patch embed
        (2, 7, 9, 6, 4, (3, 3), 1, 1), // neck 3x3
        (1, 9, 8, 5, 3, (3, 3), 2, 1),
        (2, 5, 6, 4, 7, (1, 1), 1, 0),    // pointwise: no im2col
        (1, 6, 7, 3, 2, (5, 3), 3, 2),    // taps landing wholly in the padding
        (1, 3, 3, 2, 2, (3, 3), 1, 2),    // padding wider than needed
        (2, 32, 40, 16, 8, (3, 3), 1, 1), // parallel im2col / col2im
    ] {
        let x = rng.tensor(&[b, h, w, cin], 1.0);
        let wt = rng.tensor(&[cout, cin, kh, kw], 1.0);
        let ho = (h + 2 * pad - kh) / stride + 1;
        let wo = (w + 2 * pad - kw) / stride + 1;
        let dy = rng.tensor(&[b, ho, wo, cout], 1.0);
        let (dx_ref, dw_ref, db_ref) = conv2d_grads_ref(&x, &wt, &dy, stride, pad);
        let what = format!(
            "conv2d x {:?} w {:?} s{stride} p{pad}",
            x.shape(),
            wt.shape()
        );
        let (dx, dw, db) = cpu
            .conv2d_backward(&x, &wt, &dy, stride, pad, true, true)
            .unwrap();
        check(
            &format!("{what} dx"),
            &dx.unwrap(),
            x.shape(),
            &dx_ref,
            1e-5,
        );
        check(&format!("{what} dw"), &dw, wt.shape(), &dw_ref, 1e-5);
        check(&format!("{what} db"), &db.unwrap(), &[cout], &db_ref, 1e-5);
        let (dx2, dw2, db2) = cpu
            .conv2d_backward(&x, &wt, &dy, stride, pad, false, false)
            .unwrap();
        assert!(
            dx2.is_none() && db2.is_none(),
            "{what}: unrequested gradients"
        );
        bitwise(&format!("{what} dw without dx"), &dw2, &dw);
    }
    let x = rng.tensor(&[1, 4, 4, 2], 1.0);
    let wt = rng.tensor(&[3, 2, 3, 3], 1.0);
    // Wrong dy shape, zero stride, channel mismatch.
    assert!(cpu
        .conv2d_backward(&x, &wt, &rng.tensor(&[1, 4, 4, 3], 1.0), 1, 0, true, true)
        .is_err());
    assert!(cpu
        .conv2d_backward(&x, &wt, &rng.tensor(&[1, 2, 2, 3], 1.0), 0, 0, true, true)
        .is_err());
    assert!(cpu
        .conv2d_backward(
            &x,
            &rng.tensor(&[3, 1, 3, 3], 1.0),
            &rng.tensor(&[1, 2, 2, 3], 1.0),
            1,
            0,
            true,
            true
        )
        .is_err());
}

/// Transposed-conv gradients by direct loops: `(dx, dw, db)`.
fn conv_t_grads_ref(x: &Tensor, w: &Tensor, dy: &Tensor) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, h, wd, ci) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let co = w.shape()[1];
    let (xd, wdt, yd) = (x.data(), w.data(), dy.data());
    let mut dx = vec![0.0; x.numel()];
    let mut dw = vec![0.0; w.numel()];
    let mut db = vec![0.0; co];
    for bi in 0..bn {
        for i in 0..h {
            for j in 0..wd {
                for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    for o in 0..co {
                        let g =
                            yd[((bi * 2 * h + 2 * i + di) * 2 * wd + 2 * j + dj) * co + o] as f64;
                        db[o] += g;
                        for c in 0..ci {
                            let xa = ((bi * h + i) * wd + j) * ci + c;
                            let wa = ((c * co + o) * 2 + di) * 2 + dj;
                            dx[xa] += g * wdt[wa] as f64;
                            dw[wa] += g * xd[xa] as f64;
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

#[test]
fn conv_transpose2x2_backward_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(11);
    for (b, h, w, ci, co) in [
        (2usize, 3usize, 5usize, 6usize, 4usize),
        (1, 16, 16, 32, 16),
        (1, 1, 1, 1, 1),
    ] {
        let x = rng.tensor(&[b, h, w, ci], 1.0);
        let wt = rng.tensor(&[ci, co, 2, 2], 1.0);
        let dy = rng.tensor(&[b, 2 * h, 2 * w, co], 1.0);
        let (dx_ref, dw_ref, db_ref) = conv_t_grads_ref(&x, &wt, &dy);
        let (dx, dw, db) = cpu.conv_transpose2x2_backward(&x, &wt, &dy).unwrap();
        let what = format!("conv_transpose2x2 x {:?} w {:?}", x.shape(), wt.shape());
        check(&format!("{what} dx"), &dx, x.shape(), &dx_ref, 1e-5);
        check(&format!("{what} dw"), &dw, wt.shape(), &dw_ref, 1e-5);
        check(&format!("{what} db"), &db, &[co], &db_ref, 1e-5);
    }
    let x = rng.tensor(&[1, 2, 2, 3], 1.0);
    let wt = rng.tensor(&[3, 4, 2, 2], 1.0);
    assert!(cpu
        .conv_transpose2x2_backward(&x, &wt, &rng.tensor(&[1, 4, 4, 3], 1.0))
        .is_err());
    assert!(cpu
        .conv_transpose2x2_backward(
            &x,
            &rng.tensor(&[4, 4, 2, 2], 1.0),
            &rng.tensor(&[1, 4, 4, 4], 1.0)
        )
        .is_err());
}
