//! Validation during training: loss, Dice and IoU of the model on a dataset at the model input
//! size, with prompts fixed by a seed so that epochs compare.

use super::data::Dataset;
use super::step::{mask_loss, LossConfig};
use super::trainer::{make_loader, to_step_batch, ValMetrics};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::sam::{MaskOutput, Sam, Trace};

/// Dice and IoU of a thresholded map against a mask (both empty: Dice and IoU 1).
fn dice_iou(pred: impl Iterator<Item = bool>, gt: &[f32]) -> (f64, f64) {
    let (mut inter, mut p, mut g) = (0usize, 0usize, 0usize);
    for (a, &b) in pred.zip(gt) {
        let b = b > 0.5;
        inter += (a && b) as usize;
        p += a as usize;
        g += b as usize;
    }
    if p + g == 0 {
        return (1.0, 1.0);
    }
    let dice = 2.0 * inter as f64 / (p + g) as f64;
    let iou = inter as f64 / (p + g - inter) as f64;
    (dice, iou)
}

/// Loss, Dice and IoU of `model` on `ds` (one pass, fixed prompts for a given seed). Dice and
/// IoU are measured at the model input size: the low-resolution logits are upsampled
/// bilinearly, as at inference.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Sam<B>,
    ds: &Dataset,
    batch: usize,
    seed: u64,
    prompts: (usize, usize, Option<u32>),
    loss: &LossConfig,
    mode: crate::medsa::depth_branch::DepthMode,
) -> Result<ValMetrics> {
    let mut loader = make_loader(ds, batch, seed, prompts, true)?;
    let grid = 4 * model.config.pos_grid.0;
    let mut m = ValMetrics::default();
    let mut batches = 0usize;
    let thresholds = [0.1f64, 0.3, 0.5, 0.7, 0.9].map(|t| (t / (1.0 - t)).ln() as f32);
    while let Some(b) = loader.next_batch()? {
        let sb = to_step_batch(&b, grid, mode)?;
        let x = be.upload(&sb.images)?;
        let emb = model.encode(be, &x, sb.depth, &mut Trace::off())?;
        let s = b.size;
        let (lr, iou) = model.decode(
            be,
            &emb,
            (s, s),
            &sb.prompts,
            MaskOutput::Single,
            &mut Trace::off(),
        )?;
        let logits = be.download(&lr)?;
        let (parts, _, _) = mask_loss(&logits, &be.download(&iou)?, &sb.target, loss)?;
        m.loss += parts.total;
        batches += 1;
        let up = be.download(&be.resize_bilinear(&lr, (s, s))?)?;
        let gt = b.masks()?;
        let n = s * s;
        for i in 0..b.len() {
            let (p, g) = (
                &up.data()[i * n..(i + 1) * n],
                &gt.data()[i * n..(i + 1) * n],
            );
            let (d, j) = dice_iou(p.iter().map(|&v| v > 0.0), g);
            m.dice += d;
            m.iou += j;
            let mt: f64 = thresholds
                .iter()
                .map(|&t| dice_iou(p.iter().map(|&v| v > t), g).0)
                .sum::<f64>()
                / thresholds.len() as f64;
            m.dice_multi += mt;
            m.images += 1;
        }
    }
    if m.images == 0 {
        return Err(Error::Input(
            "validation data has no image with foreground for the trained label".into(),
        ));
    }
    m.loss /= batches as f64;
    let n = m.images as f64;
    m.dice /= n;
    m.iou /= n;
    m.dice_multi /= n;
    Ok(m)
}
