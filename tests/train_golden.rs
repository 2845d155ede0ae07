//! Training building blocks against PyTorch (autograd) and MONAI: losses and their gradients,
//! 10 AdamW steps, gradient clipping (`tools/reference/write_train_fixtures.py`).
//!
//! Tolerances: the references are f64; our losses accumulate in f64 but read and return f32
//! values (logits, gradients, parameters), so rtol 1e-5 on values of order one plus an absolute
//! 1e-7 for tiny gradient entries; AdamW keeps its moments in f32 like the parameters, which
//! over 10 steps stays within 1e-5 relative.

mod common;

use medsa::train::loss::{bce_with_logits, dice_ce};
use medsa::train::optim::{adamw_step, clip_grad_norm, AdamWConfig, AdamWState};

struct Golden(Vec<u8>);

impl Golden {
    fn load() -> Self {
        let p = common::fixtures_dir().join("train/golden.safetensors");
        Golden(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }

    fn get(&self, k: &str) -> (Vec<usize>, Vec<f64>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(k).unwrap_or_else(|e| panic!("{k}: {e}"));
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    fn f32(&self, k: &str) -> Vec<f32> {
        self.get(k).1.into_iter().map(|v| v as f32).collect()
    }
}

fn close(name: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let (i, excess) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() - (atol + rtol * w.abs()))
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |a, (i, e)| if e > a.1 { (i, e) } else { a },
        );
    assert!(
        excess <= 0.0,
        "{name}: element {i}: got {}, expected {}",
        got[i],
        want[i]
    );
}

#[test]
fn bce_with_pos_weight_matches_pytorch() {
    let g = Golden::load();
    let (l, grad) = bce_with_logits(&g.f32("bce.logits"), &g.f32("bce.target"), 2.0).unwrap();
    close("bce loss", &[l], &g.get("bce.loss").1, 1e-6, 0.0);
    close(
        "bce grad",
        &grad.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &g.get("bce.grad").1,
        1e-5,
        1e-9,
    );
}

#[test]
fn dice_ce_matches_monai_one_and_three_channels() {
    let g = Golden::load();
    for (name, c) in [("dicece1", 1), ("dicece3", 3)] {
        let (shape, _) = g.get(&format!("{name}.logits"));
        let (l, grad) = dice_ce(
            &g.f32(&format!("{name}.logits")),
            &g.f32(&format!("{name}.target")),
            shape[0],
            c,
        )
        .unwrap();
        close(
            &format!("{name} loss"),
            &[l],
            &g.get(&format!("{name}.loss")).1,
            1e-6,
            0.0,
        );
        close(
            &format!("{name} grad"),
            &grad.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &g.get(&format!("{name}.grad")).1,
            1e-4,
            1e-8,
        );
    }
}

#[test]
fn ten_adamw_steps_match_pytorch_with_and_without_weight_decay() {
    let g = Golden::load();
    let grads = g.f32("adamw.grads");
    let n = 37;
    for (name, wd) in [("wd0", 0.0), ("wd01", 0.1)] {
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: wd,
            ..AdamWConfig::default()
        };
        let mut p = g.f32("adamw.p0");
        let mut st = AdamWState::default();
        let (_, traj) = g.get(&format!("adamw.{name}.traj"));
        for s in 0..10 {
            adamw_step(&cfg, cfg.lr, &mut p, &grads[s * n..(s + 1) * n], &mut st).unwrap();
            close(
                &format!("adamw {name} step {s}"),
                &p.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &traj[s * n..(s + 1) * n],
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn gradient_clipping_matches_pytorch() {
    let g = Golden::load();
    let (mut a, mut b) = (g.f32("clip.a"), g.f32("clip.b"));
    let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.5);
    close("clip norm", &[norm], &g.get("clip.norm").1, 1e-6, 0.0);
    close(
        "clip a",
        &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &g.get("clip.a_after").1,
        1e-6,
        1e-7,
    );
    close(
        "clip b",
        &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &g.get("clip.b_after").1,
        1e-6,
        1e-7,
    );
}
