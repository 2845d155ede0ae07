//! AdamW (PyTorch's `torch.optim.AdamW`; weight decay 0 is the reference's Adam), learning-rate
//! schedules and global gradient-norm clipping.
//!
//! AdamW step t (1-based) for parameter p with gradient g: `p -= lr * wd * p`;
//! `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
//! State is kept in f32 like the parameters; the arithmetic of one step in f64.

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
    if param.len() != grad.len() {
        return Err(Error::Input(format!(
            "adamw: {} parameters, {} gradients",
            param.len(),
            grad.len()
        )));
    }
    if st.m.is_empty() {
        st.m = vec![0.0; param.len()];
        st.v = vec![0.0; param.len()];
    }
    st.step += 1;
    let t = st.step as i32;
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    for i in 0..param.len() {
        let mut p = param[i] as f64;
        let g = grad[i] as f64;
        p -= lr * cfg.weight_decay * p;
        let m = cfg.beta1 * st.m[i] as f64 + (1.0 - cfg.beta1) * g;
        let v = cfg.beta2 * st.v[i] as f64 + (1.0 - cfg.beta2) * g * g;
        p -= lr / bc1 * m / (v.sqrt() / bc2.sqrt() + cfg.eps);
        st.m[i] = m as f32;
        st.v[i] = v as f32;
        param[i] = p as f32;
    }
    Ok(())
}

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
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x = (*x as f64 * coef) as f32;
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

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
