//! Convolutions against naive f64 loops: `conv2d` (strides, padding, bias) and the 2x2 stride-2
//! transposed convolution.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::Tensor;

use super::{assert_close, Rng};

fn conv2d_ref(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> (Vec<usize>, Vec<f64>) {
    let (bn, h, wd, cin) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (cout, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let mut out = vec![0.0; bn * ho * wo * cout];
    for bi in 0..bn {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let mut acc = b.map_or(0.0, |b| b.data()[o] as f64);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            for c in 0..cin {
                                let xv =
                                    x.data()[((bi * h + iy as usize) * wd + ix as usize) * cin + c];
                                let wv = w.data()[((o * cin + c) * kh + ky) * kw + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((bi * ho + oy) * wo + ox) * cout + o] = acc;
                }
            }
        }
    }
    (vec![bn, ho, wo, cout], out)
}

#[test]
fn conv2d_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(11);
    for &(b, h, w, cin, cout, k, stride, pad, bias) in &[
        (
            1usize, 9usize, 11usize, 3usize, 5usize, 3usize, 1usize, 1usize, true,
        ),
        (2, 9, 11, 4, 6, 3, 2, 1, false),
        (1, 8, 8, 7, 9, 1, 1, 0, true),
        (2, 5, 6, 16, 3, 1, 2, 0, false),
        (1, 64, 48, 3, 32, 16, 16, 0, true),
        (1, 10, 10, 2, 4, 2, 2, 0, true),
        (1, 7, 5, 3, 2, 5, 1, 2, true),
        (1, 6, 6, 3, 3, 3, 3, 2, false),
        (1, 1, 1, 2, 3, 3, 1, 1, true),
    ] {
        let x = rng.tensor(&[b, h, w, cin]);
        let wt = rng.tensor(&[cout, cin, k, k]);
        let bt = rng.tensor(&[cout]);
        let bo = bias.then_some(&bt);
        let y = cpu.conv2d(&x, &wt, bo, stride, pad).unwrap();
        let (ws, want) = conv2d_ref(&x, &wt, bo, stride, pad);
        assert_close(
            &format!("conv2d {h}x{w}x{cin}->{cout} k{k} s{stride} p{pad}"),
            &y,
            &ws,
            &want,
            1e-5,
        );
    }
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 4, 4, 3]),
            &rng.tensor(&[2, 4, 3, 3]),
            None,
            1,
            1
        )
        .is_err());
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[2, 3, 5, 5]),
            None,
            1,
            0
        )
        .is_err());
    assert!(cpu
        .conv2d(
            &rng.tensor(&[1, 4, 4, 3]),
            &rng.tensor(&[2, 3, 3, 3]),
            Some(&rng.tensor(&[3])),
            1,
            1
        )
        .is_err());
}

#[test]
fn conv_transpose2x2_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(12);
    for &(b, h, w, cin, cout) in &[
        (1usize, 3usize, 4usize, 5usize, 7usize),
        (2, 8, 8, 32, 16),
        (1, 1, 1, 1, 1),
        (1, 16, 16, 64, 32),
    ] {
        let x = rng.tensor(&[b, h, w, cin]);
        let wt = rng.tensor(&[cin, cout, 2, 2]);
        let bt = rng.tensor(&[cout]);
        let y = cpu.conv_transpose2x2(&x, &wt, &bt).unwrap();
        let mut want = vec![0.0; b * 4 * h * w * cout];
        for bi in 0..b {
            for i in 0..h {
                for j in 0..w {
                    for di in 0..2 {
                        for dj in 0..2 {
                            for o in 0..cout {
                                let mut acc = bt.data()[o] as f64;
                                for c in 0..cin {
                                    acc += x.data()[((bi * h + i) * w + j) * cin + c] as f64
                                        * wt.data()[((c * cout + o) * 2 + di) * 2 + dj] as f64;
                                }
                                want[((bi * 2 * h + 2 * i + di) * 2 * w + 2 * j + dj) * cout + o] =
                                    acc;
                            }
                        }
                    }
                }
            }
        }
        assert_close(
            &format!("conv_transpose2x2 {h}x{w}x{cin}->{cout}"),
            &y,
            &[b, 2 * h, 2 * w, cout],
            &want,
            1e-5,
        );
    }
    assert!(cpu
        .conv_transpose2x2(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[4, 2, 2, 2]),
            &rng.tensor(&[2])
        )
        .is_err());
    assert!(cpu
        .conv_transpose2x2(
            &rng.tensor(&[1, 2, 2, 3]),
            &rng.tensor(&[3, 2, 2, 2]),
            &rng.tensor(&[3])
        )
        .is_err());
}
