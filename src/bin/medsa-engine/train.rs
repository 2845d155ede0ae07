//! The `train` subcommand: `TrainArgs` turned into a `medsa::train` configuration (adapters,
//! loss, schedule, steps from epochs), the run, and its summary.

use anyhow::{bail, Result};

use medsa::backend::Backend;
use medsa::batch;

use crate::cli::{depth_mode_of, flavour_of, preset_of, TrainArgs};

pub(super) fn train_cmd<B: Backend>(be: &B, a: &TrainArgs) -> Result<()> {
    use medsa::train::checkpoint::AdapterChoice;
    use medsa::train::step::{LossConfig, LossKind};
    use medsa::train::trainer::{train, TrainConfig};
    let add_adapters = if a.add_adapters == "none" {
        AdapterChoice::default()
    } else {
        AdapterChoice::parse(&a.add_adapters)?
    };
    let (kind, cases) = medsa::train::data::discover(&a.data)?;
    let loss_kind: LossKind = match &a.loss {
        Some(l) => l.parse()?,
        None if kind == medsa::train::data::DataKind::Volumes => LossKind::DiceCe,
        None => LossKind::Bce,
    };
    let steps = match (a.steps, a.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            // Samples per epoch: 2D cases, or every slice with foreground is one sample.
            let n = cases.len() as f64
                * (1.0
                    - if a.val_data.is_some() {
                        0.0
                    } else {
                        a.val_fraction
                    });
            ((e * n) / (a.batch_size * a.accumulate) as f64)
                .ceil()
                .max(1.0) as u64
        }
        (None, None) => bail!("give --steps N or --epochs E"),
    };
    let cfg = TrainConfig {
        base: a.checkpoint.clone(),
        data: a.data.clone(),
        val_data: a.val_data.clone(),
        val_fraction: if a.val_data.is_some() {
            0.0
        } else {
            a.val_fraction
        },
        out: a.out.clone(),
        trainable: a.trainable.clone(),
        add_adapters,
        loss: LossConfig {
            kind: loss_kind,
            pos_weight: a.pos_weight,
            iou_weight: a.iou_loss_weight,
        },
        adamw: medsa::train::optim::AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        warmup_cosine: a.warmup,
        clip: a.clip,
        batch: a.batch_size,
        accumulate: a.accumulate,
        steps,
        val_every: a.val_every,
        save_every: a.save_every,
        seed: a.seed,
        data_opts: medsa::train::data::DataOptions {
            size: a.size.unwrap_or(0),
            preset: match a.preset {
                Some(p) => preset_of(p),
                None => medsa::meta::architecture_preset_of(&a.checkpoint)
                    .unwrap_or(medsa::pipeline::Preset::Medsa),
            },
            label_id: a.label_id,
            intensity: batch::Intensity::parse(&a.intensity)?,
            depth: a.depth,
        },
        prompts: (a.pos_clicks, a.neg_clicks, a.box_jitter),
        depth_mode: a.depth_mode.map(depth_mode_of),
        decoder_flavour: a.decoder_flavour.map(flavour_of),
        flip: a.flip,
        recompute: a.recompute,
        resume: a.resume,
        quiet: a.quiet,
    };
    let r = train(be, &cfg)?;
    eprintln!(
        "train: steps {}..{} on {}: {} tensors ({} values) trained as {}; {:.2} images/s",
        r.start_step,
        r.steps,
        be.name(),
        r.trained.0,
        r.trained.1,
        cfg.trainable,
        r.images_per_s
    );
    eprintln!(
        "train: loss {:.4} (first 10% of steps) -> {:.4} (last 10%)",
        r.train_loss.0, r.train_loss.1
    );
    if let (Some(i), Some(f)) = (r.initial_val, r.final_val) {
        eprintln!(
            "train: validation loss {:.4} -> {:.4}, Dice {:.4} -> {:.4}, IoU {:.4} -> {:.4} ({} images)",
            i.loss, f.loss, i.dice, f.dice, i.iou, f.iou, f.images
        );
    }
    if let Some((d, s)) = r.best {
        eprintln!(
            "train: best validation Dice {d:.4} at step {s}: {}",
            cfg.out.join("best.safetensors").display()
        );
    }
    Ok(())
}
