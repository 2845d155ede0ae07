//! Layout ops against naive index arithmetic: permute, concat / narrow / index_select, and window
//! partition / unpartition with padding.

use medsa::backend::cpu::Cpu;
use medsa::backend::Backend;
use medsa::Tensor;

use super::{exact, Rng};

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn permute_ref(x: &Tensor, perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let s = x.shape();
    let out_shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let ist = strides(s);
    let n = x.numel();
    let mut out = Vec::with_capacity(n);
    for mut i in 0..n {
        let mut idx = vec![0; out_shape.len()];
        for a in (0..out_shape.len()).rev() {
            idx[a] = i % out_shape[a];
            i /= out_shape[a];
        }
        let off: usize = (0..perm.len()).map(|a| idx[a] * ist[perm[a]]).sum();
        out.push(x.data()[off]);
    }
    (out_shape, out)
}

#[test]
fn permute_matches_naive() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(1);
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4, 5], &[0, 2, 3, 1]),
        (&[2, 3, 4, 5], &[0, 3, 1, 2]),
        (&[3, 5], &[1, 0]),
        (&[1, 64, 70, 33], &[0, 3, 1, 2]),
        (&[1, 33, 64, 70], &[0, 2, 3, 1]),
        (&[2, 3, 1, 5, 7], &[4, 2, 0, 3, 1]),
        (&[4, 6, 8], &[2, 1, 0]),
        (&[4, 6, 8], &[0, 1, 2]),
        (&[7], &[0]),
        (&[2, 1, 3], &[1, 2, 0]),
        (&[5, 2, 3, 4, 6], &[0, 3, 1, 4, 2]),
    ];
    for (shape, perm) in cases {
        let x = rng.tensor(shape);
        let (ws, want) = permute_ref(&x, perm);
        let y = cpu.permute(&x, perm).unwrap();
        exact(&format!("permute {shape:?} {perm:?}"), &y, &ws, &want);
    }
    assert!(cpu.permute(&rng.tensor(&[2, 3]), &[0, 0]).is_err());
    assert!(cpu.permute(&rng.tensor(&[2, 3]), &[0]).is_err());
}

#[test]
fn concat_narrow_index_select() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(2);
    let a = rng.tensor(&[2, 3, 4]);
    let b = rng.tensor(&[2, 5, 4]);
    let y = cpu.concat(&[&a, &b], 1).unwrap();
    let mut want = Vec::new();
    for i in 0..2 {
        want.extend_from_slice(&a.data()[i * 12..(i + 1) * 12]);
        want.extend_from_slice(&b.data()[i * 20..(i + 1) * 20]);
    }
    exact("concat dim 1", &y, &[2, 8, 4], &want);
    let c = rng.tensor(&[2, 3, 4]);
    let y = cpu.concat(&[&a, &c, &a], 0).unwrap();
    let want: Vec<f32> = [a.data(), c.data(), a.data()].concat();
    exact("concat dim 0", &y, &[6, 3, 4], &want);
    let y = cpu.concat(&[&a, &c], 2).unwrap();
    let want: Vec<f32> = (0..6)
        .flat_map(|r| [&a.data()[r * 4..r * 4 + 4], &c.data()[r * 4..r * 4 + 4]].concat())
        .collect();
    exact("concat dim 2", &y, &[2, 3, 8], &want);
    assert!(cpu.concat(&[&a, &b], 0).is_err());
    assert!(cpu.concat(&[&a, &b], 3).is_err());

    let x = rng.tensor(&[3, 7, 5]);
    let y = cpu.narrow(&x, 1, 2, 4).unwrap();
    let mut want = Vec::new();
    for i in 0..3 {
        for j in 2..6 {
            want.extend_from_slice(&x.data()[(i * 7 + j) * 5..(i * 7 + j + 1) * 5]);
        }
    }
    exact("narrow", &y, &[3, 4, 5], &want);
    let y = cpu.narrow(&x, 2, 4, 1).unwrap();
    let want: Vec<f32> = (0..21).map(|r| x.data()[r * 5 + 4]).collect();
    exact("narrow last", &y, &[3, 7, 1], &want);
    assert!(cpu.narrow(&x, 1, 5, 3).is_err());

    let y = cpu.index_select0(&x, &[2, 0, 2]).unwrap();
    let want: Vec<f32> = [&x.data()[70..105], &x.data()[0..35], &x.data()[70..105]].concat();
    exact("index_select0", &y, &[3, 7, 5], &want);
    assert!(cpu.index_select0(&x, &[3]).is_err());
}

#[test]
fn window_partition_roundtrip_and_padding() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(3);
    for &(b, h, w, c, ws) in &[
        (1, 14, 14, 3, 7),
        (2, 10, 13, 4, 4),
        (1, 64, 64, 8, 14),
        (2, 5, 3, 2, 6),
        (1, 9, 9, 1, 3),
    ] {
        let x = rng.tensor(&[b, h, w, c]);
        let (nh, nw) = (h.div_ceil(ws), w.div_ceil(ws));
        let y = cpu.window_partition(&x, ws).unwrap();
        let mut want = vec![0.0f32; b * nh * nw * ws * ws * c];
        for bi in 0..b {
            for wy in 0..nh {
                for wx in 0..nw {
                    let win = bi * nh * nw + wy * nw + wx;
                    for r in 0..ws {
                        for s in 0..ws {
                            let (yy, xx) = (wy * ws + r, wx * ws + s);
                            if yy < h && xx < w {
                                for ch in 0..c {
                                    want[((win * ws + r) * ws + s) * c + ch] =
                                        x.data()[((bi * h + yy) * w + xx) * c + ch];
                                }
                            }
                        }
                    }
                }
            }
        }
        exact(
            &format!("window_partition {h}x{w} ws {ws}"),
            &y,
            &[b * nh * nw, ws, ws, c],
            &want,
        );
        let back = cpu.window_unpartition(&y, ws, (h, w)).unwrap();
        exact("window_unpartition", &back, &[b, h, w, c], x.data());
        // Unpartition must ignore (not copy) padding content: perturb the padded windows.
        let noisy = rng.tensor(y.shape());
        let back = cpu.window_unpartition(&noisy, ws, (h, w)).unwrap();
        let mut want = vec![0.0f32; b * h * w * c];
        for bi in 0..b {
            for yy in 0..h {
                for xx in 0..w {
                    let win = bi * nh * nw + (yy / ws) * nw + xx / ws;
                    for ch in 0..c {
                        want[((bi * h + yy) * w + xx) * c + ch] =
                            noisy.data()[((win * ws + yy % ws) * ws + xx % ws) * c + ch];
                    }
                }
            }
        }
        exact("window_unpartition noisy", &back, &[b, h, w, c], &want);
    }
    assert!(cpu
        .window_unpartition(&rng.tensor(&[3, 4, 4, 2]), 4, (8, 8))
        .is_err());
    assert!(cpu.window_partition(&rng.tensor(&[3, 4, 4]), 4).is_err());
}
