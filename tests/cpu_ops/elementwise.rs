//! Element-wise ops against f64: `add_scaled` on same-shape and broadcast operands (small and
//! large, the parallel path) and the activations.

use medsa::backend::cpu::Cpu;
use medsa::backend::{Act, Backend};
use medsa::Tensor;

use super::{assert_close, f64s, gelu_ref, Rng};

#[test]
fn add_scaled_same_and_broadcast() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(4);
    let a = rng.tensor(&[2, 5, 6, 7]);
    for bshape in [
        &[2, 5, 6, 7][..],
        &[7],
        &[1, 7],
        &[6, 7],
        &[1, 1, 6, 7],
        &[5, 6, 7],
        &[1, 2, 5, 6, 7],
        &[1],
        &[1, 1],
    ] {
        let b = rng.tensor(bshape);
        let y = cpu.add_scaled(&a, 0.5, &b, -2.0).unwrap();
        let nb = b.numel();
        let want: Vec<f64> = (0..a.numel())
            .map(|i| 0.5 * a.data()[i] as f64 - 2.0 * b.data()[i % nb] as f64)
            .collect();
        assert_close(
            &format!("add_scaled b {bshape:?}"),
            &y,
            a.shape(),
            &want,
            1e-6,
        );
    }
    // Large, to exercise the parallel path.
    let a = rng.tensor(&[64, 64, 96]);
    let b = rng.tensor(&[64, 64, 96]);
    let y = cpu.add_scaled(&a, 1.0, &b, 1.0).unwrap();
    let want: Vec<f64> = a
        .data()
        .iter()
        .zip(b.data())
        .map(|(&x, &z)| x as f64 + z as f64)
        .collect();
    assert_close("add_scaled large", &y, a.shape(), &want, 1e-6);
    for bshape in [&[96][..], &[1], &[3, 64, 96], &[7 * 64 * 96]] {
        let shape_a: &[usize] = if bshape == [7 * 64 * 96] {
            &[3, 7 * 64 * 96]
        } else {
            a.shape()
        };
        let a = rng.tensor(shape_a);
        let b = rng.tensor(bshape);
        if bshape == [3, 64, 96] {
            // Not a suffix of [64, 64, 96].
            assert!(cpu.add_scaled(&a, 1.0, &b, 3.0).is_err());
            continue;
        }
        let y = cpu.add_scaled(&a, 1.0, &b, 3.0).unwrap();
        let nb = b.numel();
        let want: Vec<f64> = (0..a.numel())
            .map(|i| a.data()[i] as f64 + 3.0 * b.data()[i % nb] as f64)
            .collect();
        assert_close(
            &format!("add_scaled large b {bshape:?}"),
            &y,
            a.shape(),
            &want,
            1e-6,
        );
    }
    for bad in [&[6][..], &[5, 7], &[2, 7], &[3, 6, 7]] {
        assert!(
            cpu.add_scaled(&rng.tensor(&[2, 5, 6, 7]), 1.0, &rng.tensor(bad), 1.0)
                .is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn activations() {
    let cpu = Cpu::new();
    let mut rng = Rng::new(5);
    for n in [7usize, 1000, 100_003] {
        let x = Tensor::from_vec((0..n).map(|_| rng.uniform() * 8.0).collect(), &[n]).unwrap();
        let y = cpu.activate(&x, Act::Gelu).unwrap();
        let want: Vec<f64> = x.data().iter().map(|&v| gelu_ref(v as f64)).collect();
        assert_close("gelu", &y, &[n], &want, 1e-6);
        let y = cpu.activate(&x, Act::Relu).unwrap();
        let want: Vec<f64> = x.data().iter().map(|&v| (v as f64).max(0.0)).collect();
        assert_close("relu", &y, &[n], &want, 0.0);
        let y = cpu.activate(&x, Act::None).unwrap();
        assert_close("identity", &y, &[n], &f64s(&x), 0.0);
    }
}
