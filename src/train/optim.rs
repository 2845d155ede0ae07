//! AdamW (PyTorch's `torch.optim.AdamW`; weight decay 0 is the reference's Adam), learning-rate
//! schedules and global gradient-norm clipping.
//!
//! AdamW step t (1-based) for parameter p with gradient g: `p -= lr * wd * p`;
//! `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! State is kept in f32 like the parameters; the arithmetic of one step in f64.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (the schedule scales it).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The Med-SA reference: Adam, lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimiser state of one parameter tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamWState {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
    /// Steps taken.
    pub step: u64,
}

/// One AdamW step on `param` with `grad` at learning rate `lr` (the schedule's value).
pub fn adamw_step(
    cfg: &AdamWConfig,
    lr: f64,
    param: &mut [f32],
    grad: &[f32],
    st: &mut AdamWState,
) -> Result<()> {
    let item = AdamWItem {
        name: "a tensor",
        param,
        grad,
        state: st,
    };
    adamw_step_many(cfg, lr, &mut [item])
}

/// The AdamW update of one chunk (the formula of the module header, in f64).
#[allow(clippy::too_many_arguments)]
fn adamw_chunk(
    cfg: &AdamWConfig,
    lr: f64,
    bc1: f64,
    bc2: f64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    for i in 0..p.len() {
        let mut pi = p[i] as f64;
        let gi = g[i] as f64;
        pi -= lr * cfg.weight_decay * pi;
        let mi = cfg.beta1 * m[i] as f64 + (1.0 - cfg.beta1) * gi;
        let vi = cfg.beta2 * v[i] as f64 + (1.0 - cfg.beta2) * gi * gi;
        pi -= lr / bc1 * mi / (vi.sqrt() / bc2.sqrt() + cfg.eps);
        m[i] = mi as f32;
        v[i] = vi as f32;
        p[i] = pi as f32;
    }
}

/// One tensor of [`adamw_step_many`].
pub struct AdamWItem<'a> {
    /// What the tensor is (for errors).
    pub name: &'a str,
    /// Its values, updated in place.
    pub param: &'a mut [f32],
    /// Its gradient.
    pub grad: &'a [f32],
    /// Its optimiser state.
    pub state: &'a mut AdamWState,
}

/// [`adamw_step`] on several tensors at once, each counted as its own step, all their chunks
/// in one parallel pass (a model's trained tensors are mostly small: one tensor at a time would
/// leave most cores idle). Same bits as calling [`adamw_step`] on each. Sizes are checked
/// first, so an error leaves every state as it was.
pub fn adamw_step_many(cfg: &AdamWConfig, lr: f64, items: &mut [AdamWItem<'_>]) -> Result<()> {
    for it in items.iter() {
        let st = &it.state;
        let fresh = st.m.is_empty() && st.v.is_empty();
        if it.param.len() != it.grad.len()
            || !(fresh || st.m.len() == it.param.len() && st.v.len() == it.param.len())
        {
            return Err(Error::Input(format!(
                "adamw on {}: {} parameters, {} gradients, state moments of {} and {}",
                it.name,
                it.param.len(),
                it.grad.len(),
                st.m.len(),
                st.v.len()
            )));
        }
    }
    // Every element is independent, so chunks on all cores give the same bits as one loop: the
    // host update of a GPU training step is ~14 M elements in f64, tens of ms on one core.
    let mut tasks = Vec::new();
    for it in items.iter_mut() {
        let st = &mut *it.state;
        if st.m.is_empty() {
            st.m = vec![0.0; it.param.len()];
            st.v = vec![0.0; it.param.len()];
        }
        st.step += 1;
        let t = st.step as i32;
        let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
        for (((p, g), m), v) in it
            .param
            .chunks_mut(ADAMW_CHUNK)
            .zip(it.grad.chunks(ADAMW_CHUNK))
            .zip(it.state.m.chunks_mut(ADAMW_CHUNK))
            .zip(it.state.v.chunks_mut(ADAMW_CHUNK))
        {
            tasks.push((p, g, m, v, bc1, bc2));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(p, g, m, v, bc1, bc2)| adamw_chunk(cfg, lr, bc1, bc2, p, g, m, v));
    Ok(())
}

/// Elements per parallel task of [`adamw_step_many`] and [`clip_grad_norm`] (small tensors stay
/// one task).
const ADAMW_CHUNK: usize = 1 << 15;

/// Learning-rate schedules (as a factor of the base rate at step t, 0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay to `min_factor` at `total`.
    WarmupCosine {
        /// Warm-up steps.
        warmup: u64,
        /// Total steps.
        total: u64,
        /// Final factor of the base rate.
        min_factor: f64,
    },
}

impl Schedule {
    /// The factor of the base learning rate at step `t`.
    pub fn factor(&self, t: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine {
                warmup,
                total,
                min_factor,
            } => {
                if t < warmup {
                    (t + 1) as f64 / warmup as f64
                } else if t >= total {
                    min_factor
                } else {
                    let q = (t - warmup) as f64 / (total - warmup).max(1) as f64;
                    min_factor + 0.5 * (1.0 - min_factor) * (1.0 + (std::f64::consts::PI * q).cos())
                }
            }
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`, coefficient `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
///
/// The sum of squares is taken per fixed chunk of each tensor in parallel, then over the chunks
/// in order, so the norm does not depend on the number of threads.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let partial: Vec<f64> = grads
        .iter()
        .flat_map(|g| g.chunks(ADAMW_CHUNK))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        grads
            .iter_mut()
            .flat_map(|g| g.chunks_mut(ADAMW_CHUNK))
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|c| c.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_adamw_matches_one_loop_bit_for_bit() {
        // Several chunks plus a ragged tail, over three steps with weight decay: the chunked
        // update must give the bits of the plain per-element formula.
        let n = 3 * ADAMW_CHUNK + 17;
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let mut rng = crate::sam::random::Rng::new(9);
        let mut p = rng.tensor(&[n], 1.0).into_vec();
        let (mut p_ref, mut m_ref, mut v_ref) = (p.clone(), vec![0f32; n], vec![0f32; n]);
        let mut st = AdamWState::default();
        for t in 1..=3 {
            let g = rng.tensor(&[n], 0.1).into_vec();
            adamw_step(&cfg, 1e-3, &mut p, &g, &mut st).unwrap();
            let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
            for i in 0..n {
                let (mut x, gi) = (p_ref[i] as f64, g[i] as f64);
                x -= 1e-3 * cfg.weight_decay * x;
                let m = cfg.beta1 * m_ref[i] as f64 + (1.0 - cfg.beta1) * gi;
                let v = cfg.beta2 * v_ref[i] as f64 + (1.0 - cfg.beta2) * gi * gi;
                x -= 1e-3 / bc1 * m / (v.sqrt() / bc2.sqrt() + cfg.eps);
                (p_ref[i], m_ref[i], v_ref[i]) = (x as f32, m as f32, v as f32);
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&p_ref));
        assert_eq!(bits(&st.m), bits(&m_ref));
        assert_eq!(bits(&st.v), bits(&v_ref));
    }

    #[test]
    fn adamw_on_many_tensors_matches_one_at_a_time() {
        // Tensors of one chunk, several chunks and a ragged tail, one of them a step ahead:
        // the joint pass gives the bits of adamw_step on each.
        let cfg = AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        let mut rng = crate::sam::random::Rng::new(11);
        let sizes = [5, ADAMW_CHUNK, 2 * ADAMW_CHUNK + 3, 1];
        let mut p: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| rng.tensor(&[n], 1.0).into_vec())
            .collect();
        let mut st: Vec<AdamWState> = sizes.iter().map(|_| AdamWState::default()).collect();
        adamw_step(&cfg, 1e-3, &mut p[2], &vec![0.5; sizes[2]], &mut st[2]).unwrap();
        let (mut p1, mut st1) = (p.clone(), st.clone());
        for _ in 0..2 {
            let g: Vec<Vec<f32>> = sizes
                .iter()
                .map(|&n| rng.tensor(&[n], 0.1).into_vec())
                .collect();
            for i in 0..sizes.len() {
                adamw_step(&cfg, 1e-3, &mut p1[i], &g[i], &mut st1[i]).unwrap();
            }
            let mut items: Vec<AdamWItem> = p
                .iter_mut()
                .zip(&g)
                .zip(st.iter_mut())
                .map(|((p, g), s)| AdamWItem {
                    name: "t",
                    param: p,
                    grad: g,
                    state: s,
                })
                .collect();
            adamw_step_many(&cfg, 1e-3, &mut items).unwrap();
        }
        assert_eq!(st, st1);
        let bits = |v: &[Vec<f32>]| v.concat().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p), bits(&p1));
        // A mismatched tensor is an error that names it and changes nothing.
        let before = st.clone();
        let mut bad = vec![0f32; 3];
        let (first, rest) = st.split_at_mut(1);
        let mut items = vec![
            AdamWItem {
                name: "fine",
                param: &mut p[0],
                grad: &[0.0; 5],
                state: &mut first[0],
            },
            AdamWItem {
                name: "odd",
                param: &mut bad,
                grad: &[0.0; 4],
                state: &mut rest[2],
            },
        ];
        let err = adamw_step_many(&cfg, 1e-3, &mut items)
            .unwrap_err()
            .to_string();
        assert!(err.contains("odd"), "{err}");
        assert_eq!(st, before);
    }

    #[test]
    fn clip_norm_is_the_same_on_any_number_of_threads() {
        let mut rng = crate::sam::random::Rng::new(10);
        let a = rng.tensor(&[2 * ADAMW_CHUNK + 5], 1.0).into_vec();
        let b = rng.tensor(&[7], 1.0).into_vec();
        let run = |threads: usize| {
            let (mut a, mut b) = (a.clone(), b.clone());
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let n = pool.install(|| clip_grad_norm(&mut [&mut a, &mut b], 1.0));
            (
                n.to_bits(),
                a.iter().chain(&b).map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        };
        let one = run(1);
        assert_eq!(one, run(3));
        let direct: f64 = a
            .iter()
            .chain(&b)
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((f64::from_bits(one.0) - direct).abs() < 1e-12 * direct);
    }

    #[test]
    fn adamw_rejects_state_of_another_size() {
        let mut st = AdamWState {
            m: vec![0.0; 3],
            v: vec![0.0; 3],
            step: 1,
        };
        let err = adamw_step(
            &AdamWConfig::default(),
            1e-3,
            &mut [0.0; 4],
            &[0.0; 4],
            &mut st,
        );
        assert!(err.unwrap_err().to_string().contains("moments of 3"));
    }

    #[test]
    fn warmup_cosine_shape() {
        let s = Schedule::WarmupCosine {
            warmup: 10,
            total: 110,
            min_factor: 0.1,
        };
        assert!((s.factor(0) - 0.1).abs() < 1e-12);
        assert!((s.factor(9) - 1.0).abs() < 1e-12);
        assert!((s.factor(10) - 1.0).abs() < 1e-12);
        assert!((s.factor(60) - 0.55).abs() < 1e-12);
        assert!((s.factor(500) - 0.1).abs() < 1e-12);
    }
}
