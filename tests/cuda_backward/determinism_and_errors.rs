//! Bit-for-bit reproducibility of the CUDA attention, LayerNorm and `sum_rows` backward across
//! two identical runs, and bad shapes reported as errors.

use medsa::backend::cuda::Precision;
use medsa::backend::{Act, Backend};
use medsa::sam::random::Rng;
use medsa::Tensor;

use super::{attn_backward, attn_inputs, device};

/// Every reduction has a fixed order: two runs give identical bits.
#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn backward_is_deterministic() {
    for p in [Precision::F32, Precision::Bf16] {
        let Some(be) = device(p) else { return };
        let mut rng = Rng::new(23);
        let case = (2, 2, 64, (14, 14), (14, 14), true);
        let ins = attn_inputs(&mut rng, &case).unwrap();
        let dev: Vec<_> = ins.iter().map(|t| be.upload(t).unwrap()).collect();
        let once = || -> Vec<Tensor> {
            let mut v: Vec<Tensor> = attn_backward(&be, &dev, &case)
                .unwrap()
                .iter()
                .map(|t| be.download(t).unwrap())
                .collect();
            let (x, g, dy) = (
                be.upload(&rng_tensor(31, &[5000, 256], 3.0)).unwrap(),
                be.upload(&rng_tensor(32, &[256], 1.0)).unwrap(),
                be.upload(&rng_tensor(33, &[5000, 256], 1.0)).unwrap(),
            );
            let (dx, dg, db) = be.layer_norm_backward(&x, &g, &dy, 1e-6).unwrap();
            for t in [dx, dg, db, be.sum_rows(&dy, 256).unwrap()] {
                v.push(be.download(&t).unwrap());
            }
            v
        };
        let (a, b) = (once(), once());
        for (n, (x, y)) in a.iter().zip(&b).enumerate() {
            let same = x
                .data()
                .iter()
                .zip(y.data())
                .all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{p:?}: output {n} differs between two identical runs");
        }
    }
}

fn rng_tensor(seed: u64, shape: &[usize], a: f32) -> Tensor {
    Rng::new(seed).tensor(shape, a)
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn bad_shapes_are_errors() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let t = |s: &[usize]| be.upload(&Tensor::zeros(s)).unwrap();
    assert!(be.activate_backward(&t(&[3]), &t(&[4]), Act::Gelu).is_err());
    assert!(be.sum_rows(&t(&[3, 4]), 5).is_err());
    assert!(be.linear_backward_input(&t(&[3, 4]), &t(&[5, 6])).is_err());
    assert!(be
        .linear_backward_weight(&t(&[3, 4]), &t(&[2, 6]), true)
        .is_err());
    assert!(be
        .layer_norm_backward(&t(&[3, 4]), &t(&[5]), &t(&[3, 4]), 1e-6)
        .is_err());
    let q = t(&[1, 4, 8]);
    let k = t(&[1, 5, 8]);
    assert!(be
        .attention_backward(&q, &k, &k, &k, &q, 2, 1.0, None)
        .is_err());
    let q = t(&[1, 4, 2 * 130]);
    assert!(be
        .attention_backward(&q, &q, &q, &q, &q, 2, 1.0, None)
        .is_err());
    assert!(be
        .conv2d_backward(
            &t(&[1, 8, 8, 3]),
            &t(&[4, 3, 3, 3]),
            &t(&[1, 7, 7, 4]),
            1,
            1,
            true,
            true
        )
        .is_err());
}
