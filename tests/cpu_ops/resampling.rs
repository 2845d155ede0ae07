//! Bilinear and bicubic resizes against direct 2-D references, and hand-derived values on a
//! ramp.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::Tensor;

use super::{assert_close, exact, Rng};

/// Bilinear, written directly in 2-D as PyTorch's kernel does.
fn bilinear_ref(x: &Tensor, oh: usize, ow: usize) -> Vec<f64> {
    let (b, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let coord = |o: usize, inp: usize, out: usize| {
        let src = ((o as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
        let i0 = src.floor() as usize;
        let i0 = i0.min(inp - 1);
        (i0, (i0 + 1).min(inp - 1), src - i0 as f64)
    };
    let mut out = vec![0.0; b * c * oh * ow];
    for p in 0..b * c {
        let px = |y: usize, xx: usize| x.data()[(p * h + y) * w + xx] as f64;
        for oy in 0..oh {
            let (y0, y1, ly) = coord(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, lx) = coord(ox, w, ow);
                out[(p * oh + oy) * ow + ox] = (1.0 - ly)
                    * ((1.0 - lx) * px(y0, x0) + lx * px(y0, x1))
                    + ly * ((1.0 - lx) * px(y1, x0) + lx * px(y1, x1));
            }
        }
    }
    out
}

fn cubic_w(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// Bicubic as a full 4x4 weighted sum per output pixel.
fn bicubic_ref(x: &Tensor, oh: usize, ow: usize) -> Vec<f64> {
    let (b, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let taps = |o: usize, inp: usize, out: usize| {
        let src = (o as f64 + 0.5) * inp as f64 / out as f64 - 0.5;
        let i = src.floor();
        let t = src - i;
        let i = i as isize;
        let mut r = [(0usize, 0.0f64); 4];
        for (k, slot) in r.iter_mut().enumerate() {
            let off = k as isize - 1;
            let idx = (i + off).clamp(0, inp as isize - 1) as usize;
            *slot = (idx, cubic_w(t - off as f64));
        }
        r
    };
    let mut out = vec![0.0; b * c * oh * ow];
    for p in 0..b * c {
        for oy in 0..oh {
            let ty = taps(oy, h, oh);
            for ox in 0..ow {
                let tx = taps(ox, w, ow);
                let mut acc = 0.0;
                for &(yi, wy) in &ty {
                    for &(xi, wx) in &tx {
                        acc += wy * wx * x.data()[(p * h + yi) * w + xi] as f64;
                    }
                }
                out[(p * oh + oy) * ow + ox] = acc;
            }
        }
    }
    out
}

#[test]
fn resize_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(13);
    for &(b, c, h, w, oh, ow) in &[
        (1usize, 1usize, 4usize, 4usize, 8usize, 8usize),
        (2, 3, 5, 7, 11, 3),
        (1, 2, 64, 64, 256, 256),
        (1, 1, 256, 200, 64, 50),
        (1, 3, 9, 9, 9, 9),
        (1, 1, 1, 1, 3, 2),
        (1, 2, 6, 10, 4, 17),
    ] {
        let x = rng.tensor(&[b, c, h, w]);
        let y = cpu.resize_bilinear(&x, (oh, ow)).unwrap();
        assert_close(
            &format!("bilinear {h}x{w}->{oh}x{ow}"),
            &y,
            &[b, c, oh, ow],
            &bilinear_ref(&x, oh, ow),
            1e-6,
        );
        let y = cpu.resize_bicubic(&x, (oh, ow)).unwrap();
        assert_close(
            &format!("bicubic {h}x{w}->{oh}x{ow}"),
            &y,
            &[b, c, oh, ow],
            &bicubic_ref(&x, oh, ow),
            1e-6,
        );
    }
    assert!(cpu
        .resize_bilinear(&rng.tensor(&[1, 4, 4]), (2, 2))
        .is_err());
    assert!(cpu
        .resize_bicubic(&rng.tensor(&[1, 1, 4, 4]), (0, 2))
        .is_err());
}

#[test]
fn resize_known_values_ramp() {
    let cpu = Cpu::new();
    let ramp = Tensor::from_vec(vec![0.0, 1.0, 2.0, 3.0], &[1, 1, 1, 4]).unwrap();
    // Bilinear 2x: src = o/2 - 1/4, clamped at 0 on the left and at the last tap on the right.
    let y = cpu.resize_bilinear(&ramp, (1, 8)).unwrap();
    exact(
        "bilinear ramp x2",
        &y,
        &[1, 1, 1, 8],
        &[0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0],
    );
    // Bilinear 0.5x: src = 2o + 1/2 -> midpoints 0.5, 2.5.
    let y = cpu.resize_bilinear(&ramp, (1, 2)).unwrap();
    exact("bilinear ramp /2", &y, &[1, 1, 1, 2], &[0.5, 2.5]);
    // Bicubic 2x, by hand. With t the fractional source position, the four taps i-1..i+2 get
    // weights far(t+1), near(t), near(1-t), far(2-t), where near(x) = (1.25x - 2.25)x^2 + 1 and
    // far(x) = -0.75x^3 + 3.75x^2 - 6x + 3:
    //   t = 0.25: far(1.25) = -0.10546875, near(0.25) = 0.87890625, near(0.75) = 0.26171875,
    //             far(1.75) = -0.03515625 (they sum to 1);
    //   t = 0.75: the same four weights reversed.
    // o = 0: src = -0.25 (not clamped), i = -1, t = 0.75, taps -2..1 clamp to 0,0,0,1 -> values
    //        0,0,0,1, so y = far(1.25) = -0.10546875.
    // o = 1: src = 0.25, taps -1..2 clamp to 0,0,1,2: 0.26171875 - 2 * 0.03515625 = 0.19140625.
    // o = 2: src = 0.75: 0.87890625 - 2 * 0.10546875 = 0.66796875 (the clamped left tap pulls
    //        it below the ramp's 0.75).
    // o = 3: src = 1.25, taps 0..3 all interior: 0.87890625 + 2 * 0.26171875 - 3 * 0.03515625
    //        = 1.296875 (not 1.25: with A = -0.75 the kernel's first moment is 0.296875, not t;
    //        only A = -0.5 reproduces linear functions).
    // o = 5..7 mirror o = 2..0 about 1.5: 3 - y.
    let left = [-0.10546875f32, 0.19140625, 0.66796875, 1.296875];
    let want: Vec<f32> = left
        .iter()
        .copied()
        .chain(left.iter().rev().map(|v| 3.0 - v))
        .collect();
    let y = cpu.resize_bicubic(&ramp, (1, 8)).unwrap();
    exact("bicubic ramp x2", &y, &[1, 1, 1, 8], &want);
}
