//! One training step: the loss on the decoder's low-resolution logits, the backward pass, and
//! the optimiser update with f32 master weights.
//!
//! The loss is computed on the low-resolution mask logits `[B, M, 4h, 4w]` against targets
//! resampled to that grid (the data loader's job): upsampling the logits first, as the reference
//! does for its 256x256 outputs, only adds a fixed linear map in front of the same loss, at 16x
//! the cost.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{Grads, Param};
use crate::sam::{DepthSpec, MaskOutput, Prompts, Sam};
use crate::tensor::Tensor;
use crate::train::loss::{bce_with_logits, dice_ce};
use crate::train::optim::{
    adamw_step_many, clip_grad_norm, AdamWConfig, AdamWItem, AdamWState, Schedule,
};

/// Which mask loss is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// BCE with logits and `pos_weight` (the 2D reference).
    Bce,
    /// MONAI's DiceCE with sigmoid and squared prediction (the 3D reference).
    DiceCe,
    /// Their sum.
    Both,
}

impl std::str::FromStr for LossKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bce" => Ok(LossKind::Bce),
            "dicece" | "dice_ce" | "dice-ce" => Ok(LossKind::DiceCe),
            "both" | "bce+dicece" => Ok(LossKind::Both),
            _ => Err(Error::Input(format!(
                "loss \"{s}\": expected bce, dicece or both"
            ))),
        }
    }
}

/// Loss settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// The mask loss.
    pub kind: LossKind,
    /// BCE's weight of positive pixels (the reference uses 2).
    pub pos_weight: f32,
    /// Weight of the IoU-head loss `mean((iou - IoU(mask > 0, target))^2)`; 0 (the reference)
    /// leaves the IoU head untrained.
    pub iou_weight: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::Bce,
            pos_weight: 2.0,
            iou_weight: 0.0,
        }
    }
}

/// The parts of one loss value.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossParts {
    /// Sum of the weighted parts.
    pub total: f64,
    /// BCE term (0 when unused).
    pub bce: f64,
    /// DiceCE term (0 when unused).
    pub dice: f64,
    /// IoU-head term (0 when unused).
    pub iou: f64,
}

/// The loss of `logits` `[B, M, H, W]` and `iou` `[B, M]` against `target` `[B, M, H, W]`
/// (0/1). Returns the parts, `dL/dlogits`, and `dL/diou` when the IoU term is on.
pub fn mask_loss(
    logits: &Tensor,
    iou: &Tensor,
    target: &Tensor,
    cfg: &LossConfig,
) -> Result<(LossParts, Tensor, Option<Tensor>)> {
    let s = logits.shape().to_vec();
    if s.len() != 4 || target.shape() != s.as_slice() || iou.shape() != [s[0], s[1]] {
        return Err(Error::Input(format!(
            "loss: logits {:?}, iou {:?} and target {:?} do not match ([B, M, H, W], [B, M])",
            s,
            iou.shape(),
            target.shape()
        )));
    }
    let (b, m) = (s[0], s[1]);
    let mut parts = LossParts::default();
    let mut grad = vec![0f32; logits.numel()];
    if matches!(cfg.kind, LossKind::Bce | LossKind::Both) {
        let (l, g) = bce_with_logits(logits.data(), target.data(), cfg.pos_weight)?;
        parts.bce = l;
        grad.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    }
    if matches!(cfg.kind, LossKind::DiceCe | LossKind::Both) {
        let (l, g) = dice_ce(logits.data(), target.data(), b, m)?;
        parts.dice = l;
        grad.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    }
    let mut diou = None;
    if cfg.iou_weight != 0.0 {
        let hw = s[2] * s[3];
        let n = (b * m) as f64;
        let mut dv = vec![0f32; b * m];
        let mut l = 0f64;
        for (g, dg) in dv.iter_mut().enumerate() {
            let (xs, ts) = (
                &logits.data()[g * hw..(g + 1) * hw],
                &target.data()[g * hw..(g + 1) * hw],
            );
            let (mut inter, mut union) = (0usize, 0usize);
            for (&x, &t) in xs.iter().zip(ts) {
                let (p, q) = (x > 0.0, t > 0.5);
                inter += (p && q) as usize;
                union += (p || q) as usize;
            }
            let t = if union == 0 {
                0.0
            } else {
                inter as f64 / union as f64
            };
            let e = iou.data()[g] as f64 - t;
            l += e * e;
            *dg = (cfg.iou_weight as f64 * 2.0 * e / n) as f32;
        }
        parts.iou = l / n;
        diou = Some(Tensor::from_vec(dv, &[b, m])?);
    }
    parts.total = parts.bce + parts.dice + cfg.iou_weight as f64 * parts.iou;
    Ok((parts, Tensor::from_vec(grad, &s)?, diou))
}

/// One batch of training data, already preprocessed for the model.
pub struct Batch {
    /// `[B, 3, S, S]`.
    pub images: Tensor,
    /// Prompts per sample, in model-input pixels.
    pub prompts: Prompts,
    /// `[B, M, 4h, 4w]` 0/1 targets on the low-resolution mask grid.
    pub target: Tensor,
    /// Volumes: slices per volume (the batch is volumes x slices).
    pub depth: Option<DepthSpec>,
}

/// Forward, loss and backward of one (micro-)batch; gradients accumulate into `grads`, scaled
/// by `scale` (1 / accumulation steps). Returns the loss parts and the logits.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<B: Backend>(
    be: &B,
    model: &Sam<B>,
    batch: &Batch,
    output: MaskOutput,
    loss: &LossConfig,
    grads: &mut Grads<B>,
    scale: f32,
    recompute: bool,
) -> Result<(LossParts, Tensor)> {
    let images = be.upload(&batch.images)?;
    let (masks, iou, cache) = model.forward_t(
        be,
        &images,
        &batch.prompts,
        output,
        batch.depth,
        grads,
        recompute,
    )?;
    let logits = be.download(&masks)?;
    let iou_h = be.download(&iou)?;
    let (parts, dl, di) = mask_loss(&logits, &iou_h, &batch.target, loss)?;
    let dl = scale_tensor(dl, scale)?;
    let dl = be.upload(&dl)?;
    let di = match di {
        Some(d) => Some(be.upload(&scale_tensor(d, scale)?)?),
        None => None,
    };
    model.backward(be, &cache, &dl, di.as_ref(), grads)?;
    Ok((parts, logits))
}

fn scale_tensor(t: Tensor, s: f32) -> Result<Tensor> {
    if s == 1.0 {
        return Ok(t);
    }
    let shape = t.shape().to_vec();
    Tensor::from_vec(t.into_vec().into_iter().map(|x| x * s).collect(), &shape)
}

/// AdamW over a model's trained parameters, with f32 master weights on the host (so bf16
/// device storage does not swallow small updates), a learning-rate schedule and optional global
/// gradient clipping.
pub struct Optimizer {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Global gradient-norm limit.
    pub clip: Option<f64>,
    /// Steps taken.
    pub step: u64,
    /// Per-parameter state.
    pub states: BTreeMap<String, AdamWState>,
    /// f32 master copies of the trained parameters (in-model shapes).
    pub master: BTreeMap<String, Tensor>,
}

impl Optimizer {
    /// A fresh optimiser.
    pub fn new(cfg: AdamWConfig, schedule: Schedule, clip: Option<f64>) -> Self {
        Optimizer {
            cfg,
            schedule,
            clip,
            step: 0,
            states: BTreeMap::new(),
            master: BTreeMap::new(),
        }
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.cfg.lr * self.schedule.factor(self.step)
    }

    /// Applies one update from `grads` (then clears them). Returns the gradient norm before
    /// clipping.
    pub fn step<B: Backend>(
        &mut self,
        be: &B,
        model: &mut Sam<B>,
        grads: &mut Grads<B>,
    ) -> Result<f64> {
        let mut host: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for (k, g) in &grads.map {
            host.insert(k.clone(), be.download(g)?.into_vec());
        }
        let norm = {
            let mut refs: Vec<&mut [f32]> = host.values_mut().map(|v| v.as_mut_slice()).collect();
            match self.clip {
                Some(c) => clip_grad_norm(&mut refs, c),
                None => clip_grad_norm(&mut refs, f64::INFINITY),
            }
        };
        if !norm.is_finite() {
            // Applying it would turn the adapters into NaN; refuse before anything changes.
            let bad: Vec<String> = host
                .iter()
                .filter_map(|(k, g)| {
                    let n = g.iter().filter(|v| !v.is_finite()).count();
                    (n > 0).then(|| format!("`{k}` ({n} values)"))
                })
                .take(5)
                .collect();
            return Err(Error::Input(format!(
                "the gradient norm is {norm}: non-finite gradients in {}; the update was not applied",
                if bad.is_empty() {
                    "the norm's sum (overflow)".to_string()
                } else {
                    bad.join(", ")
                }
            )));
        }
        let lr = self.lr();
        // Masters on the first step (from the model); then every trained tensor's master and
        // state leave the maps for one parallel update over all their chunks, and go back.
        let mut params = model.params();
        params.retain(|(name, _)| host.contains_key(name));
        for (name, p) in &params {
            if !self.master.contains_key(name) {
                let t = match p {
                    Param::Dev(t) => be.download(t)?,
                    Param::Host(t) => (*t).clone(),
                };
                self.master.insert(name.clone(), t);
            }
        }
        let mut work: Vec<(String, Tensor, AdamWState)> = params
            .iter()
            .filter_map(|(name, _)| {
                let master = self.master.remove(name)?;
                Some((
                    name.clone(),
                    master,
                    self.states.remove(name).unwrap_or_default(),
                ))
            })
            .collect();
        let mut items: Vec<AdamWItem> = work
            .iter_mut()
            .map(|(name, master, state)| AdamWItem {
                name,
                param: master.data_mut(),
                grad: &host[name.as_str()],
                state,
            })
            .collect();
        let stepped = adamw_step_many(&self.cfg, lr, &mut items);
        drop(items);
        for (name, master, state) in work {
            self.master.insert(name.clone(), master);
            self.states.insert(name, state);
        }
        stepped.map_err(|e| Error::Input(format!("optimiser step: {e}")))?;
        let mut host_changed = false;
        for (name, p) in params {
            let master = &self.master[&name];
            match p {
                Param::Dev(t) => *t = be.upload(master)?,
                Param::Host(t) => {
                    *t = master.clone();
                    host_changed = true;
                }
            }
        }
        if host_changed {
            model.refresh_caches(be)?;
        }
        grads.clear();
        self.step += 1;
        Ok(norm)
    }
}
