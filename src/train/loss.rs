//! Segmentation losses on mask logits, each returning the loss and its gradient with respect to
//! the logits (so a backward pass starts from it).
//!
//! - [`bce_with_logits`]: `mean(-(w t log s(x) + (1 - t) log(1 - s(x))))` with `w` = pos_weight,
//!   PyTorch's `BCEWithLogitsLoss(pos_weight=w)`; the 2D reference uses `w = 2`.
//!   Gradient: `(s(x) (w t + 1 - t) - w t) / n`.
//! - [`dice_ce`]: MONAI's `DiceCELoss(sigmoid=True, squared_pred=True)`, the 3D reference's loss:
//!   per (batch, channel) `1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5)` with
//!   `p = s(x)`, averaged; plus BCE with logits for one channel, or softmax cross-entropy over
//!   the channels with one-hot targets for several (MONAI's rule).
//!
//! Logits and targets are `[B, C, ...]` row-major, computed in f64 so the loss of a large mask
//! does not lose the small per-element terms.

use crate::error::{Error, Result};

/// Numerically stable `log(1 + exp(-|x|))`-based sigmoid pieces.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(sigmoid(x))` without overflow.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn check(logits: &[f32], target: &[f32], what: &str) -> Result<()> {
    if logits.len() != target.len() || logits.is_empty() {
        return Err(Error::Input(format!(
            "{what}: {} logits and {} targets",
            logits.len(),
            target.len()
        )));
    }
    Ok(())
}

/// BCE with logits and `pos_weight`, mean reduction. Returns `(loss, dloss/dlogits)`.
pub fn bce_with_logits(logits: &[f32], target: &[f32], pos_weight: f32) -> Result<(f64, Vec<f32>)> {
    check(logits, target, "bce_with_logits")?;
    let n = logits.len() as f64;
    let w = pos_weight as f64;
    let mut loss = 0f64;
    let grad = logits
        .iter()
        .zip(target)
        .map(|(&x, &t)| {
            let (x, t) = (x as f64, t as f64);
            loss -= w * t * log_sigmoid(x) + (1.0 - t) * log_sigmoid(-x);
            ((sigmoid(x) * (w * t + 1.0 - t) - w * t) / n) as f32
        })
        .collect();
    Ok((loss / n, grad))
}

/// MONAI `DiceCELoss(sigmoid=True, squared_pred=True)` for logits/targets `[B, C, spatial...]`
/// given as `(b, c, spatial)`. Returns `(loss, dloss/dlogits)`.
pub fn dice_ce(logits: &[f32], target: &[f32], b: usize, c: usize) -> Result<(f64, Vec<f32>)> {
    check(logits, target, "dice_ce")?;
    if b == 0 || c == 0 || !logits.len().is_multiple_of(b * c) {
        return Err(Error::Input(format!(
            "dice_ce: {} values are not [{b}, {c}, ...]",
            logits.len()
        )));
    }
    let s = logits.len() / (b * c);
    let mut grad = vec![0f32; logits.len()];
    // Dice term, mean over (b, c).
    let (snr, sdr) = (1e-5f64, 1e-5f64);
    let groups = (b * c) as f64;
    let mut dice = 0f64;
    for g in 0..b * c {
        let xs = &logits[g * s..(g + 1) * s];
        let ts = &target[g * s..(g + 1) * s];
        let (mut inter, mut den) = (0f64, 0f64);
        for (&x, &t) in xs.iter().zip(ts) {
            let p = sigmoid(x as f64);
            inter += p * t as f64;
            den += p * p + (t as f64) * (t as f64);
        }
        let num = 2.0 * inter + snr;
        let d = den + sdr;
        dice += 1.0 - num / d;
        for (i, (&x, &t)) in xs.iter().zip(ts).enumerate() {
            let p = sigmoid(x as f64);
            let df_dp = -(2.0 * t as f64 * d - num * 2.0 * p) / (d * d);
            grad[g * s + i] = (df_dp * p * (1.0 - p) / groups) as f32;
        }
    }
    let dice = dice / groups;
    // Cross-entropy term.
    let ce = if c == 1 {
        let (l, g2) = bce_with_logits(logits, target, 1.0)?;
        for (g, d) in grad.iter_mut().zip(g2) {
            *g += d;
        }
        l
    } else {
        // Softmax over channels at every (b, position); mean over b * positions.
        let n = (b * s) as f64;
        let mut l = 0f64;
        for bi in 0..b {
            for pos in 0..s {
                let idx = |ch: usize| (bi * c + ch) * s + pos;
                let m = (0..c)
                    .map(|ch| logits[idx(ch)] as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..c).map(|ch| (logits[idx(ch)] as f64 - m).exp()).sum();
                for ch in 0..c {
                    let lp = logits[idx(ch)] as f64 - m - z.ln();
                    let t = target[idx(ch)] as f64;
                    l -= t * lp;
                    grad[idx(ch)] +=
                        ((lp.exp() * (0..c).map(|k| target[idx(k)] as f64).sum::<f64>() - t) / n)
                            as f32;
                }
            }
        }
        l / n
    };
    Ok((dice + ce, grad))
}
