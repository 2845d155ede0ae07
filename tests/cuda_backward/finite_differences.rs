//! Checks that need no CPU backward: the CUDA gradients of attention, LayerNorm and conv2d
//! against directional finite differences of the CPU forward.

use medsa::backend::cpu::Cpu;
use medsa::backend::cuda::Precision;
use medsa::backend::Backend;
use medsa::sam::random::Rng;
use medsa::selftest::{report, Check};
use medsa::Tensor;

use super::{attn_backward, attn_forward, attn_inputs, attn_name, device, fail};

/// `sum(a * b)` in f64.
fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum()
}

fn axpy(x: &Tensor, a: f32, u: &Tensor) -> Tensor {
    let v = x
        .data()
        .iter()
        .zip(u.data())
        .map(|(x, u)| x + a * u)
        .collect();
    Tensor::from_vec(v, x.shape()).unwrap()
}

/// Directional derivatives: for every input `i` with a device gradient `grads[i]`, a random
/// direction `u` gives `<grads[i], u>` against the central difference of
/// `L(x) = <dy, forward(x)>` (CPU forward, f32, `eps` step), within 1% of the typical size of
/// `<grad, u>` (`|grad| |u| / sqrt(n)`; a wrong gradient misses by about that much).
fn fd_checks(
    name: &str,
    inputs: &[Tensor],
    dy: &Tensor,
    grads: &[(usize, &str, Tensor)],
    forward: &dyn Fn(&[Tensor]) -> medsa::Result<Tensor>,
    rng: &mut Rng,
) -> Vec<Check> {
    let eps = 1e-2f32;
    let mut out = Vec::new();
    for (i, label, g) in grads {
        let cname = format!("{name} d{label} (finite differences)");
        let u = rng.tensor(inputs[*i].shape(), 1.0);
        let at = |a: f32| -> medsa::Result<f64> {
            let mut x = inputs.to_vec();
            x[*i] = axpy(&inputs[*i], a, &u);
            Ok(dot(dy, &forward(&x)?))
        };
        let (lp, lm) = match (at(eps), at(-eps)) {
            (Ok(p), Ok(m)) => (p, m),
            (Err(e), _) | (_, Err(e)) => {
                out.push(fail(&cname, e));
                continue;
            }
        };
        let fd = (lp - lm) / (2.0 * eps as f64);
        let an = dot(g, &u);
        let typical = (dot(g, g) * dot(&u, &u) / g.numel().max(1) as f64).sqrt();
        let err = (fd - an).abs();
        let ok = err <= 1e-2 * typical + 1e-3 * an.abs();
        out.push(Check {
            name: cname,
            ok,
            max_err_rel_rms: (err / typical.max(1e-30)) as f32,
            detail: if ok {
                String::new()
            } else {
                format!("<grad, u> = {an:.6e}, finite difference {fd:.6e}")
            },
        });
    }
    out
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn attention_backward_matches_finite_differences() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let mut rng = Rng::new(21);
    let mut checks = Vec::new();
    for case in [
        (2, 2, 64, (8, 8), (8, 8), true),
        (1, 2, 80, (14, 14), (14, 14), true),
        (1, 2, 24, (4, 5), (6, 7), true),
        (2, 3, 16, (37, 1), (53, 1), false),
    ] {
        let name = attn_name(&case);
        let res = (|| -> medsa::Result<Vec<Check>> {
            let ins = attn_inputs(&mut rng, &case)?;
            let dev: Vec<_> = ins
                .iter()
                .map(|t| be.upload(t))
                .collect::<medsa::Result<_>>()?;
            let g = attn_backward(&be, &dev, &case)?;
            let labels = ["q", "k", "v", "rh", "rw"];
            let idx = [0usize, 1, 2, 4, 5];
            let grads: Vec<(usize, &str, Tensor)> = g
                .iter()
                .enumerate()
                .map(|(n, t)| Ok((idx[n], labels[n], be.download(t)?)))
                .collect::<medsa::Result<_>>()?;
            let cpu = Cpu::new();
            let fwd = |x: &[Tensor]| attn_forward(&cpu, x, &case);
            let d_o = ins[3].clone();
            Ok(fd_checks(&name, &ins, &d_o, &grads, &fwd, &mut rng))
        })();
        match res {
            Ok(c) => checks.extend(c),
            Err(e) => checks.push(fail(&name, e)),
        }
    }
    let failed = report(&checks);
    assert_eq!(failed, 0, "{failed} finite-difference checks failed");
}

#[test]
#[cfg_attr(
    medsa_no_cuda_tests,
    ignore = "no GPU driver and no CUDA kernel emulator (x86-64 Linux and a C++ compiler) here"
)]
fn layer_norm_and_conv_backward_match_finite_differences() {
    let Some(be) = device(Precision::F32) else {
        return;
    };
    let mut rng = Rng::new(22);
    let cpu = Cpu::new();
    let mut checks = Vec::new();
    let res = (|| -> medsa::Result<()> {
        // LayerNorm: inputs [x, g, b]; gradients dx, dg, db.
        let (rows, c) = (40, 33);
        let ins = vec![
            rng.tensor(&[rows, c], 3.0),
            rng.tensor(&[c], 1.0),
            rng.tensor(&[c], 1.0),
        ];
        let dy = rng.tensor(&[rows, c], 1.0);
        let (dx, dg, db) = be.layer_norm_backward(
            &be.upload(&ins[0])?,
            &be.upload(&ins[1])?,
            &be.upload(&dy)?,
            1e-5,
        )?;
        let grads = vec![
            (0, "x", be.download(&dx)?),
            (1, "g", be.download(&dg)?),
            (2, "b", be.download(&db)?),
        ];
        let fwd = |x: &[Tensor]| cpu.layer_norm(&x[0], &x[1], &x[2], 1e-5);
        checks.extend(fd_checks(
            "layer_norm_backward 40x33",
            &ins,
            &dy,
            &grads,
            &fwd,
            &mut rng,
        ));
        // conv2d 3x3 pad 1 stride 2: inputs [x, w, b].
        let ins = vec![
            rng.tensor(&[2, 9, 11, 5], 1.0),
            rng.tensor(&[7, 5, 3, 3], 0.3),
            rng.tensor(&[7], 0.3),
        ];
        let dy = rng.tensor(&[2, 5, 6, 7], 1.0);
        let (dx, dw, db) = be.conv2d_backward(
            &be.upload(&ins[0])?,
            &be.upload(&ins[1])?,
            &be.upload(&dy)?,
            2,
            1,
            true,
            true,
        )?;
        let mut grads = Vec::new();
        if let Some(dx) = dx {
            grads.push((0, "x", be.download(&dx)?));
        }
        grads.push((1, "w", be.download(&dw)?));
        if let Some(db) = db {
            grads.push((2, "b", be.download(&db)?));
        }
        let fwd = |x: &[Tensor]| cpu.conv2d(&x[0], &x[1], Some(&x[2]), 2, 1);
        checks.extend(fd_checks(
            "conv2d_backward 3x3 s2 p1",
            &ins,
            &dy,
            &grads,
            &fwd,
            &mut rng,
        ));
        Ok(())
    })();
    if let Err(e) = res {
        checks.push(fail("layer_norm / conv2d finite differences", e));
    }
    let failed = report(&checks);
    assert_eq!(failed, 0, "{failed} finite-difference checks failed");
}
